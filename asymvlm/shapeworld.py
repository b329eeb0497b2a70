"""ShapeWorld: captioned images whose captions have a known ambiguity.

Two versions: 3, the default (:data:`WORLD_VERSION`; scenes of 1-3 objects on a 3 x 3 grid
with relations, :mod:`asymvlm.shapeworld3`), and 2, described here and selectable with
``version=2`` so that earlier results reproduce. In version 2 every image holds a *target*
object (and optionally distractors) with four attributes drawn from finite sets: shape, colour,
size and position (a quadrant). Every image gets one caption per specificity level, from vague to
exact:

=====  ==========================  =====================================  ==========
level  name                        example                                ambiguity
=====  ==========================  =====================================  ==========
0      ``object``                  "an object"                            192
1      ``colour`` or ``shape``     "a red object" / "a circle"            32 / 48
2      ``colour shape``            "a red circle"                         8
3      ``size colour shape``       "a small red circle"                   4
4      ``size colour shape         "a small red circle in the top left"   1
       position``
=====  ==========================  =====================================  ==========

A caption is a partial attribute assignment; the ground truth of a caption is the set of
attribute combinations consistent with it and its *ambiguity* is that set's size (the product of
the sizes of the unspecified attributes). An image is consistent with a caption when any of its
objects satisfies it (:func:`consistency_matrix`).

Domains, for federation and merging experiments:

* caption styles (:data:`CAPTION_STYLES`): ``plain``, ``photo`` (a template prefix),
  ``synonyms`` (other words for every attribute), ``reordered`` (shape first, attributes after);
* visual styles (:data:`VISUAL_STYLES`): ``plain`` (dark background), ``light`` (light
  background), ``noise`` (Gaussian pixel noise), ``stripes`` (a textured background).

Generation is vectorised numpy and deterministic given the seed (about 45k images/s as arrays and
6k/s as a ``datasets.Dataset`` with PNG-encoded images on 2 CPU cores; ``bench/shapeworld.py``).

Example:
    >>> ds = generate(8, seed=0, version=2)
    >>> ds[0]["captions"][0], ds[0]["caption_ambiguity"][0], ds[0]["caption_ambiguity"][2:]
    ('an object', 192, [8, 4, 1])
    >>> ds[0]["image"].size, generate(2, seed=0)[0]["image"].size  # version 2, the default version 3
    ((32, 32), (48, 48))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "WORLD_VERSION",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "ATTRIBUTES",
    "LEVELS",
    "LEVEL_NAMES",
    "CAPTION_STYLES",
    "VISUAL_STYLES",
    "ShapeWorldConfig",
    "WorldArrays",
    "generate",
    "generate_arrays",
    "render",
    "describe",
    "caption_spec",
    "ambiguity",
    "ambiguities",
    "consistency_matrix",
    "caption_truth",
    "vocabulary",
    "spec_from_names",
    "level_ambiguity",
    "dataset_version",
    "attribute_names",
    "level_names",
]

# Bumped whenever the same seed and config would render or caption differently: anything built
# from generated data (the toy CLIP) keys its cache on it. Every version stays selectable
# (ShapeWorldConfig.version), so results built on an earlier one reproduce.
WORLD_VERSION = 3
WORLD_VERSIONS = (2, 3)

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 45, 45),
    "green": (45, 185, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (155, 65, 200),
    "cyan": (50, 205, 215),
}
SIZES = {"small": 0.13, "big": 0.22}  # radius as a fraction of the image side
POSITIONS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}  # (x, y) centre as fractions
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS)}
LEVELS = (0, 1, 2, 3, 4)
LEVEL_NAMES = ("object", "colour or shape", "colour shape", "size colour shape", "size colour shape position")

SYNONYMS = {
    "small": "tiny",
    "big": "large",
    "red": "crimson",
    "green": "lime",
    "blue": "navy",
    "yellow": "golden",
    "purple": "violet",
    "cyan": "teal",
    "circle": "disc",
    "square": "box",
    "triangle": "wedge",
    "cross": "plus",
    "object": "thing",
    "top": "upper",
    "bottom": "lower",
}
CAPTION_STYLES = ("plain", "photo", "synonyms", "reordered")
VISUAL_STYLES = ("plain", "light", "noise", "stripes")


@dataclass(frozen=True)
class ShapeWorldConfig:
    """What to generate. Styles are sampled uniformly per image from the given tuples.

    ``version`` picks the world (:data:`WORLD_VERSIONS`): 2, this module's single-object world, or
    3, :mod:`asymvlm.shapeworld3`'s scenes of 1-3 objects with relations. ``image_size``,
    ``max_objects`` and ``levels`` left at None take the version's defaults (32 / 1 / 0-4 for
    version 2, 48 / 3 / 0-5 for version 3).
    """

    image_size: int | None = field(default=None, metadata={"help": "Image side in pixels (None: the version's)."})
    caption_styles: tuple[str, ...] = field(default=("plain",), metadata={"help": f"Any of {CAPTION_STYLES}."})
    visual_styles: tuple[str, ...] = field(default=("plain",), metadata={"help": f"Any of {VISUAL_STYLES}."})
    max_objects: int | None = field(
        default=None, metadata={"help": "Objects per scene at most (uniform from 1); None: the version's."}
    )
    levels: tuple[int, ...] | None = field(default=None, metadata={"help": "Caption levels per image, in order."})
    colour_jitter: float = field(default=18.0, metadata={"help": "Uniform +- jitter of each colour channel."})
    position_jitter: float | None = field(
        default=None, metadata={"help": "Uniform +- jitter of the centre (fraction; None: 0.05 v2, 0.03 v3)."}
    )
    size_jitter: float = field(default=0.12, metadata={"help": "Relative uniform +- jitter of the radius."})
    version: int = field(default=WORLD_VERSION, metadata={"help": f"World version, one of {WORLD_VERSIONS}."})

    def __post_init__(self) -> None:
        if self.version not in WORLD_VERSIONS:
            raise ValueError(f"version must be one of {WORLD_VERSIONS}, got {self.version!r}")
        v3 = self.version == 3
        defaults = {
            "image_size": 48 if v3 else 32,
            "max_objects": 3 if v3 else 1,
            "levels": _v3().LEVELS if v3 else LEVELS,
            "position_jitter": 0.03 if v3 else 0.05,
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        for name, given, allowed in (
            ("caption_styles", self.caption_styles, CAPTION_STYLES),
            ("visual_styles", self.visual_styles, VISUAL_STYLES),
        ):
            bad = [s for s in given if s not in allowed]
            if bad or not given:
                raise ValueError(f"{name} must be a non-empty subset of {allowed}, got {given}")
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [16, 512], got {self.image_size}")
        cells = _v3().DEFAULT_WORLD.cells if v3 else len(POSITIONS)
        if not 1 <= self.max_objects <= cells:
            raise ValueError(f"max_objects must be in [1, {cells}], got {self.max_objects}")
        allowed_levels = _v3().LEVELS if v3 else LEVELS
        if not self.levels or any(lv not in allowed_levels for lv in self.levels):
            raise ValueError(f"levels must be a non-empty subset of {allowed_levels}, got {self.levels}")


_V3_WIDTH = 8  # asymvlm.shapeworld3.SPEC_WIDTH (not imported at module load)
DEFAULT_DATASET_VERSION = WORLD_VERSION  # what the dataset name "shapeworld" means (the offline default's world)


def dataset_version(name: str | None) -> int | None:
    """The world version a dataset name asks for: ``shapeworld`` (the default world,
    :data:`DEFAULT_DATASET_VERSION`), ``shapeworld:2`` or ``shapeworld:3``; None for any other name.

    Example:
        >>> dataset_version("shapeworld:3"), dataset_version("imagefolder:/data")
        (3, None)
    """
    if name == "shapeworld":
        return DEFAULT_DATASET_VERSION
    if isinstance(name, str) and name.startswith("shapeworld:"):
        tail = name.split(":", 1)[1]
        if tail not in {str(v) for v in WORLD_VERSIONS}:
            raise ValueError(f"unknown ShapeWorld version in {name!r}; choose from {list(WORLD_VERSIONS)}")
        return int(tail)
    return None


def _v3():
    from asymvlm import shapeworld3

    return shapeworld3


def attribute_names(version: int = WORLD_VERSION) -> dict[str, tuple[str, ...]]:
    """The value names of each attribute (shape, colour, size, position) in world ``version``;
    version 3's positions are its grid cells. Attribute index ``i`` of an object is
    ``attribute_names(v)[attr][i]``.

    Example:
        >>> attribute_names(3)["position"][4], attribute_names(2)["shape"]
        ('centre', ('circle', 'square', 'triangle', 'cross'))
    """
    if version == 3:
        w = _v3().DEFAULT_WORLD
        return {"shape": w.shapes, "colour": w.colours, "size": w.sizes, "position": w.cell_names()}
    return dict(ATTRIBUTES)


def level_names(version: int = WORLD_VERSION) -> tuple[str, ...]:
    """The caption level names of world ``version``."""
    return _v3().LEVEL_NAMES if version == 3 else LEVEL_NAMES


@dataclass
class WorldArrays:
    """The raw generated world (what :func:`generate` wraps into a ``datasets.Dataset``).

    Attributes:
        images: (N, H, W, 3) uint8.
        objects: (N, max_objects, 4) int attribute indices (shape, colour, size, position), -1
            for absent distractors; object 0 is the target.
        caption_style, visual_style: (N,) indices into the style tuples.
        specs: (N, L, 4) int caption specs (attribute index, -1 = unspecified), one per level.
        captions: N lists of L strings.
    """

    images: np.ndarray
    objects: np.ndarray
    caption_style: np.ndarray
    visual_style: np.ndarray
    specs: np.ndarray
    captions: list[list[str]]
    config: ShapeWorldConfig


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------
def caption_spec(target: Sequence[int], level: int, colour_not_shape: bool = True) -> np.ndarray:
    """The (shape, colour, size, position) indices a level-``level`` caption of ``target`` states
    (-1 = unspecified). Level 1 states the colour (``colour_not_shape``) or the shape.

    Example:
        >>> caption_spec([2, 1, 0, 3], 3).tolist(), caption_spec([2, 1, 0, 3], 1, False).tolist()
        ([2, 1, 0, -1], [2, -1, -1, -1])
    """
    keep = {0: (), 1: ((1,) if colour_not_shape else (0,)), 2: (0, 1), 3: (0, 1, 2), 4: (0, 1, 2, 3)}[level]
    spec = np.full(4, -1, dtype=np.int64)
    for a in keep:
        spec[a] = target[a]
    return spec


def ambiguity(spec: Sequence[int]) -> int:
    """Number of attribute combinations consistent with a caption spec.

    Example:
        >>> ambiguity([-1, 0, -1, -1])   # "a red object": 4 shapes x 2 sizes x 4 positions
        32

    A version-3 spec (:data:`asymvlm.shapeworld3.SPEC_WIDTH` entries) gets version 3's exact
    probability instead (:func:`asymvlm.shapeworld3.ambiguity`, up to 3 objects).
    """
    if len(spec) == _V3_WIDTH:
        return _v3().ambiguity(spec)
    sizes = [len(v) for v in ATTRIBUTES.values()]
    return int(np.prod([n for n, s in zip(sizes, spec) if s < 0]))


def ambiguities(specs: np.ndarray) -> np.ndarray:
    """Vectorised :func:`ambiguity` over the last axis of an (..., 4) spec array (or version 3's)."""
    if np.shape(specs)[-1] == _V3_WIDTH:
        return _v3().ambiguities(specs)
    sizes = np.array([len(v) for v in ATTRIBUTES.values()], dtype=np.int64)
    return np.where(np.asarray(specs) < 0, sizes, 1).prod(-1)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(spec: Sequence[int], style: str = "plain") -> str:
    """The caption text of a spec in a caption style.

    Example:
        >>> describe([0, 0, 0, 0]), describe([0, 0, 0, 0], "synonyms"), describe([-1, 0, -1, -1], "reordered")
        ('a small red circle in the top left', 'a tiny crimson disc at the upper left', 'an object, red')
    """
    if len(spec) == _V3_WIDTH:
        return _v3().describe(spec, style)
    shape = SHAPES[spec[0]] if spec[0] >= 0 else None
    colour = tuple(COLOURS)[spec[1]] if spec[1] >= 0 else None
    size = tuple(SIZES)[spec[2]] if spec[2] >= 0 else None
    position = tuple(POSITIONS)[spec[3]] if spec[3] >= 0 else None
    if style == "synonyms":

        def syn(w):
            return None if w is None else " ".join(SYNONYMS.get(p, p) for p in w.split())

        shape, colour, size, position = syn(shape), syn(colour), syn(size), syn(position)
        noun = shape or SYNONYMS["object"]
        prep = "at the"
    else:
        noun = shape or "object"
        prep = "in the"
    if style == "reordered":
        head = f"{_article(noun)} {noun}"
        tail = [w for w in (colour, size, position) if w]
        return ", ".join([head, *tail])
    words = [w for w in (size, colour, noun) if w]
    text = f"{_article(words[0])} {' '.join(words)}"
    if position:
        text += f" {prep} {position}"
    if style == "photo":
        text = f"a photo of {text}"
    return text


@functools.cache
def _describe_cached(spec: tuple[int, ...], style: str) -> str:
    return describe(spec, style)


def vocabulary(version: int = WORLD_VERSION) -> list[str]:
    """Every word any caption style of world ``version`` can produce (for word-level tokenizers), sorted."""
    if version == 3:
        return _v3().vocabulary()
    words = {"a", "an", "the", "in", "at", "of", "photo", "object", ","}
    for values in ATTRIBUTES.values():
        for v in values:
            words.update(v.split())
    for k, v in SYNONYMS.items():
        words.update(k.split())
        words.update(v.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
def _shape_masks(
    shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, size: int, names: Sequence[str] = SHAPES
) -> np.ndarray:
    """(N, H, W) bool masks of N shapes (indices into ``names``) centred at (cx, cy) px, radius r px."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    dx = coords[None, None, :] - cx[:, None, None]  # (N, 1, W)
    dy = coords[None, :, None] - cy[:, None, None]  # (N, H, 1)
    rr = r[:, None, None]
    masks = np.zeros((len(shape), size, size), dtype=bool)
    for i, name in enumerate(names):
        sel = shape == i
        if not sel.any():
            continue
        x, y, q = dx[sel], dy[sel], rr[sel]
        if name == "circle":
            m = x * x + y * y <= q * q
        elif name == "square":
            m = (np.abs(x) <= 0.82 * q) & (np.abs(y) <= 0.82 * q)
        elif name == "triangle":  # apex up, base at +0.75 r
            m = (y <= 0.75 * q) & (np.abs(x) <= 0.62 * (y + q))
        elif name == "diamond":
            m = np.abs(x) + np.abs(y) <= q
        elif name == "ring":
            d2 = x * x + y * y
            m = (d2 <= q * q) & (d2 >= (0.55 * q) ** 2)
        else:  # cross
            m = ((np.abs(x) <= 0.32 * q) & (np.abs(y) <= q)) | ((np.abs(y) <= 0.32 * q) & (np.abs(x) <= q))
        masks[sel] = m
    return masks


def render(
    objects: np.ndarray,
    visual_style: np.ndarray,
    config: ShapeWorldConfig,
    rng: np.random.Generator,
    tables: tuple[Sequence[str], dict, dict, dict] | None = None,
) -> np.ndarray:
    """Render (N, max_objects, 4) attribute indices into (N, H, W, 3) uint8 images.

    Works in uint8 and touches only object pixels when painting; the ``noise`` style adds
    uniform integer noise in [-24, 24] (standard deviation ~14). ``tables`` = (shapes, colours,
    sizes, positions) of another world version (default: this module's, version 2).
    """
    shapes, colours, sizes, positions = tables or (SHAPES, COLOURS, SIZES, POSITIONS)
    n, size = objects.shape[0], config.image_size
    styles = np.asarray(config.visual_styles)[visual_style]
    img = np.full((n, size, size, 3), 28, dtype=np.uint8)
    img[styles == "light"] = 226
    stripes = np.nonzero(styles == "stripes")[0]
    if stripes.size:
        grid = np.arange(size)
        pattern = ((((grid[:, None] + grid[None, :]) // 3) % 2) * 38 + 24).astype(np.uint8)
        img[stripes] = pattern[None, :, :, None]
    palette = np.array(list(colours.values()), dtype=np.float32)
    radii = np.array(list(sizes.values()), dtype=np.float32)
    centres = np.array(list(positions.values()), dtype=np.float32)
    for k in range(objects.shape[1]):
        rows = np.nonzero(objects[:, k, 0] >= 0)[0]
        if rows.size == 0:
            continue
        obj = objects[rows, k]
        m = rows.size
        r = radii[obj[:, 2]] * size * (1 + rng.uniform(-config.size_jitter, config.size_jitter, m))
        c = centres[obj[:, 3]] + rng.uniform(-config.position_jitter, config.position_jitter, (m, 2))
        masks = _shape_masks(
            obj[:, 0],
            (c[:, 0] * size).astype(np.float32),
            (c[:, 1] * size).astype(np.float32),
            r.astype(np.float32),
            size,
            shapes,
        )  # (m, H, W)
        colour = palette[obj[:, 1]] + rng.uniform(-config.colour_jitter, config.colour_jitter, (m, 3))
        colour = np.clip(np.rint(colour), 0, 255).astype(np.uint8)
        which, ys, xs = np.nonzero(masks)
        img[rows[which], ys, xs] = colour[which]
    noise = np.nonzero(styles == "noise")[0]
    if noise.size:
        jitter = rng.integers(-24, 25, (noise.size, size, size, 3), dtype=np.int16)
        img[noise] = np.clip(img[noise].astype(np.int16) + jitter, 0, 255).astype(np.uint8)
    return img


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
def _sample_objects(n: int, config: ShapeWorldConfig, rng: np.random.Generator) -> np.ndarray:
    k = config.max_objects
    objects = np.full((n, k, 4), -1, dtype=np.int64)
    counts = [len(v) for v in ATTRIBUTES.values()]
    for a, c in enumerate(counts):
        objects[:, :, a] = rng.integers(0, c, (n, k))
    # distinct quadrants per image; the number of objects is uniform in 1..max_objects
    positions = np.argsort(rng.random((n, len(POSITIONS))), axis=1)[:, :k]
    objects[:, :, 3] = positions
    n_obj = rng.integers(1, k + 1, n)
    objects[np.arange(k)[None, :] >= n_obj[:, None]] = -1
    return objects


def generate_arrays(n: int, seed: int = 0, config: ShapeWorldConfig | None = None, **overrides: Any) -> WorldArrays:
    """Generate ``n`` images with captions as numpy arrays (deterministic in ``seed`` and config)."""
    config = config or ShapeWorldConfig(**overrides)
    if overrides and config is not None and not isinstance(config, ShapeWorldConfig):
        raise TypeError("config must be a ShapeWorldConfig")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if config.version == 3:
        return _generate_v3(n, seed, config)
    rng = np.random.default_rng(seed)
    objects = _sample_objects(n, config, rng)
    caption_style = rng.integers(0, len(config.caption_styles), n)
    visual_style = rng.integers(0, len(config.visual_styles), n)
    images = render(objects, visual_style, config, rng)
    # caption specs, vectorised: which attributes each level states (level 1: colour or shape)
    colour_not_shape = rng.random(n) < 0.5
    specs = np.full((n, len(config.levels), 4), -1, dtype=np.int64)
    target = objects[:, 0]
    for j, lv in enumerate(config.levels):
        keep = np.zeros((n, 4), dtype=bool)
        keep[:, : {0: 0, 1: 0, 2: 2, 3: 3, 4: 4}[lv]] = True
        if lv == 1:
            keep[:, 1] = colour_not_shape
            keep[:, 0] = ~colour_not_shape
        specs[:, j] = np.where(keep, target, -1)
    captions = [
        [_describe_cached(tuple(int(v) for v in s), config.caption_styles[caption_style[i]]) for s in specs[i]]
        for i in range(n)
    ]
    return WorldArrays(images, objects, caption_style, visual_style, specs, captions, config)


def _generate_v3(n: int, seed: int, config: ShapeWorldConfig) -> WorldArrays:
    """Version 3 (:mod:`asymvlm.shapeworld3`) through the same renderer and arrays."""
    m = _v3()
    world = m.DEFAULT_WORLD
    rng = np.random.default_rng(seed)
    objects = m.sample_objects(n, config.max_objects, world, rng)
    caption_style = rng.integers(0, len(config.caption_styles), n)
    visual_style = rng.integers(0, len(config.visual_styles), n)
    images = render(objects, visual_style, config, rng, tables=(world.shapes, m.COLOURS, m.SIZES, world.centres()))
    specs = m.caption_specs(objects, config.levels, rng, world)
    styles = config.caption_styles
    captions = [
        [m.describe_cached(tuple(int(v) for v in s), styles[caption_style[i]]) for s in specs[i]] for i in range(n)
    ]
    return WorldArrays(images, objects, caption_style, visual_style, specs, captions, config)


def _png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes with fast compression (what datasets.Image stores)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def generate(n: int, seed: int = 0, config: ShapeWorldConfig | None = None, **overrides: Any):
    """Generate a ShapeWorld split as a ``datasets.Dataset``.

    Columns: ``image`` (PIL), ``image_id``, the target's ``shape``/``colour``/``size``/``position``,
    ``objects`` (all objects' attributes), ``caption_style``, ``visual_style``, ``captions``,
    ``caption_levels``, ``caption_ambiguity`` and the caption specs ``caption_shape``,
    ``caption_colour``, ``caption_size``, ``caption_position`` ("" = unspecified).

    Args:
        n: number of images.
        seed: the generator seed (same seed and config -> identical dataset).
        config: a :class:`ShapeWorldConfig`, or its fields as keyword arguments.
    """
    import datasets

    w = generate_arrays(n, seed, config, **overrides)
    v3 = w.config.version == 3
    names = attribute_names(w.config.version)

    def name(attr: str, idx: int) -> str:
        return names[attr][idx] if idx >= 0 else ""

    keys = list(ATTRIBUTES)
    data = {
        "image": [{"bytes": _png(im), "path": None} for im in w.images],
        "image_id": list(range(n)),
        **{a: [name(a, int(v)) for v in w.objects[:, 0, k]] for k, a in enumerate(keys)},
        "objects": [
            [{a: name(a, int(o[k])) for k, a in enumerate(keys)} for o in objs if o[0] >= 0] for objs in w.objects
        ],
        "caption_style": [w.config.caption_styles[i] for i in w.caption_style],
        "visual_style": [w.config.visual_styles[i] for i in w.visual_style],
        "captions": w.captions,
        "caption_levels": [list(w.config.levels)] * n,
        "caption_ambiguity": ambiguities(w.specs).tolist(),
        **{f"caption_{a}": [[name(a, int(s[k])) for s in spec] for spec in w.specs] for k, a in enumerate(keys)},
    }
    extra: dict[str, Any] = {}
    if v3:  # the second object of level 5 and "alone"
        m = _v3()
        rel = ["", *m.RELATIONS]
        data["caption_relation"] = [[rel[int(s[m.REL]) + 1] for s in spec] for spec in w.specs]
        data["caption_shape2"] = [[name("shape", int(s[m.SHAPE2])) for s in spec] for spec in w.specs]
        data["caption_colour2"] = [[name("colour", int(s[m.COLOUR2])) for s in spec] for spec in w.specs]
        data["caption_alone"] = [[bool(s[m.ALONE] > 0) for s in spec] for spec in w.specs]
        extra = {
            **{
                c: datasets.Sequence(datasets.Value("string"))
                for c in ("caption_relation", "caption_shape2", "caption_colour2")
            },
            "caption_alone": datasets.Sequence(datasets.Value("bool")),
        }
    obj_feature = {a: datasets.Value("string") for a in keys}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            **{a: datasets.Value("string") for a in keys},
            "objects": datasets.List(obj_feature) if hasattr(datasets, "List") else [obj_feature],
            "caption_style": datasets.Value("string"),
            "visual_style": datasets.Value("string"),
            "captions": datasets.Sequence(datasets.Value("string")),
            "caption_levels": datasets.Sequence(datasets.Value("int64")),
            "caption_ambiguity": datasets.Sequence(datasets.Value("float64" if v3 else "int64")),
            **{f"caption_{a}": datasets.Sequence(datasets.Value("string")) for a in keys},
            **extra,
        }
    )
    return datasets.Dataset.from_dict(data, features=features)


# ----------------------------------------------------------------------------------------------
# ground truth
# ----------------------------------------------------------------------------------------------
def caption_truth(world: WorldArrays) -> Callable[[Sequence[str]], list[np.ndarray]]:
    """``truth(captions) -> [rows]``: for captions of this world (texts any of its images carries),
    the rows of the images each caption is true of (:func:`consistency_matrix`), e.g. the ground
    truth a served ShapeWorld gallery calibrates ``p_correct`` on.

    Example:
        >>> w = generate_arrays(20, seed=0)
        >>> truth = caption_truth(w)
        >>> rows = truth([w.captions[3][-1], w.captions[3][0]])
        >>> 3 in rows[0] and 3 in rows[1] and len(rows[1]) >= len(rows[0])
        True
    """
    spec_of: dict[str, np.ndarray] = {}
    for caps, specs in zip(world.captions, world.specs):
        for c, spec in zip(caps, specs):
            spec_of.setdefault(c, spec)

    def truth(captions: Sequence[str]) -> list[np.ndarray]:
        missing = [c for c in captions if c not in spec_of]
        if missing:
            raise ValueError(f"{len(missing)} caption(s) are not this world's, e.g. {missing[0]!r}")
        if not captions:
            return []
        cm = consistency_matrix(np.stack([spec_of[c] for c in captions]), world.objects)
        return [np.flatnonzero(row) for row in cm]

    return truth


def consistency_matrix(specs: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """(T, I) bool: image i is consistent with caption t (some object of i satisfies every
    attribute the caption states).

    Args:
        specs: (T, 4) caption specs (attribute indices, -1 = unspecified).
        objects: (I, K, 4) object attributes (-1 rows = absent), or (I, 4) for one object each.
    """
    specs = np.asarray(specs)
    if specs.shape[-1] == _V3_WIDTH:
        return _v3().consistency_matrix(specs, objects)
    objects = np.asarray(objects)
    if objects.ndim == 2:
        objects = objects[:, None, :]
    present = objects[:, :, 0] >= 0  # (I, K)
    ok = (specs[:, None, None, :] < 0) | (specs[:, None, None, :] == objects[None, :, :, :])  # (T, I, K, 4)
    return (ok.all(-1) & present[None]).any(-1)


def spec_from_names(shape: str = "", colour: str = "", size: str = "", position: str = "") -> np.ndarray:
    """Attribute names ("" = unspecified) -> a spec of indices (the inverse of the dataset columns)."""
    out = []
    for attr, value in zip(ATTRIBUTES, (shape, colour, size, position)):
        out.append(ATTRIBUTES[attr].index(value) if value else -1)
    return np.array(out, dtype=np.int64)


def level_ambiguity(version: int = WORLD_VERSION) -> dict[int, float]:
    """Mean ambiguity of each level (level 1 mixes colour-only and shape-only captions); version 3:
    the mean probability mass, :func:`asymvlm.shapeworld3.level_ambiguity`."""
    if version == 3:
        return _v3().level_ambiguity()
    sizes = {a: len(v) for a, v in ATTRIBUTES.items()}
    total = math.prod(sizes.values())
    colour_shape = sizes["colour"] * sizes["shape"]
    return {
        0: float(total),
        1: (total / sizes["colour"] + total / sizes["shape"]) / 2,
        2: total / colour_shape,
        3: total / (colour_shape * sizes["size"]),
        4: 1.0,
    }
