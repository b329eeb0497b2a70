"""ShapeWorld: captioned images whose captions have a known ambiguity (the one API over its versions).

Two versions, each a module behind this one with the same function names, picked from
:data:`VERSIONS` by ``version`` (or, for a caption spec, by its width):

* 3, the default (:data:`WORLD_VERSION`; :mod:`asymvlm.worlds.shapeworld.v3`): scenes of 1-3
  objects on a 3 x 3 grid, six caption levels up to a relation between two objects, a caption's
  ambiguity the exact probability that a generated scene satisfies it;
* 2 (:mod:`asymvlm.worlds.shapeworld.v2`), selectable with ``version=2`` so that earlier results
  reproduce: one target object (and optionally distractors) with shape, colour, size and a quadrant,
  five caption levels from "an object" (ambiguity 192) to "a small red circle in the top left" (1).
  Its attribute tables (:data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`, :data:`POSITIONS`,
  :data:`ATTRIBUTES`, :data:`LEVELS`, :data:`LEVEL_NAMES`) are exported here.

A caption is a partial attribute assignment; an image is consistent with a caption when any of its
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from asymvlm.errors import ConfigError, InputError
from asymvlm.worlds.shapeworld import v2, v3
from asymvlm.worlds.shapeworld.v2 import (
    ATTRIBUTES,
    COLOURS,
    LEVEL_NAMES,
    LEVELS,
    POSITIONS,
    SHAPES,
    SIZES,
    caption_spec,
    spec_from_names,
)

__all__ = [
    "WORLD_VERSION",
    "WORLD_VERSIONS",
    "VERSIONS",
    "DEFAULT_DATASET_VERSION",
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
# world version -> the module that generates, captions and judges it (the same function names)
VERSIONS: dict[int, ModuleType] = {2: v2, 3: v3}
WORLD_VERSIONS = tuple(VERSIONS)
_BY_SPEC_WIDTH = {m.SPEC_WIDTH: m for m in VERSIONS.values()}  # a caption spec's width names its version
DEFAULT_DATASET_VERSION = WORLD_VERSION  # what the dataset name "shapeworld" means (the offline default's world)

CAPTION_STYLES = ("plain", "photo", "synonyms", "reordered")
VISUAL_STYLES = ("plain", "light", "noise", "stripes")


def _of_spec(spec_or_specs: Any) -> ModuleType:
    """The version module of a caption spec (or an array of them): by the width of its last axis
    (version 2's for any width no version has, as ever)."""
    return _BY_SPEC_WIDTH.get(np.shape(spec_or_specs)[-1], v2)


@dataclass(frozen=True)
class ShapeWorldConfig:
    """What to generate. Styles are sampled uniformly per image from the given tuples.

    ``version`` picks the world (:data:`WORLD_VERSIONS`): 2, :mod:`asymvlm.worlds.shapeworld.v2`'s
    single-object world, or 3, :mod:`asymvlm.worlds.shapeworld.v3`'s scenes of 1-3 objects with
    relations. ``image_size``, ``max_objects``, ``levels`` and ``position_jitter`` left at None take
    the version's ``DEFAULTS`` (32 / 1 / 0-4 / 0.05 for version 2, 48 / 3 / 0-5 / 0.03 for version 3).
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
        if self.version not in VERSIONS:
            raise ConfigError(f"version must be one of {WORLD_VERSIONS}, got {self.version!r}")
        world = VERSIONS[self.version]
        for name, value in world.DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        for name, given, allowed in (
            ("caption_styles", self.caption_styles, CAPTION_STYLES),
            ("visual_styles", self.visual_styles, VISUAL_STYLES),
        ):
            bad = [s for s in given if s not in allowed]
            if bad or not given:
                raise ConfigError(f"{name} must be a non-empty subset of {allowed}, got {given}")
        if not 16 <= self.image_size <= 512:
            raise ConfigError(f"image_size must be in [16, 512], got {self.image_size}")
        if not 1 <= self.max_objects <= world.CELLS:
            raise ConfigError(f"max_objects must be in [1, {world.CELLS}], got {self.max_objects}")
        if not self.levels or any(lv not in world.LEVELS for lv in self.levels):
            raise ConfigError(f"levels must be a non-empty subset of {world.LEVELS}, got {self.levels}")


def dataset_version(name: str | None) -> int | None:
    """The world version a dataset name asks for: ``shapeworld`` (the default world,
    :data:`DEFAULT_DATASET_VERSION`), ``shapeworld:2`` or ``shapeworld:3``; None for any other name.

    Raises:
        ConfigError: ``shapeworld:<v>`` with a version that is not one of :data:`WORLD_VERSIONS`.

    Example:
        >>> dataset_version("shapeworld:3"), dataset_version("imagefolder:/data")
        (3, None)
    """
    if name == "shapeworld":
        return DEFAULT_DATASET_VERSION
    if isinstance(name, str) and name.startswith("shapeworld:"):
        tail = name.split(":", 1)[1]
        if tail not in {str(v) for v in WORLD_VERSIONS}:
            raise ConfigError(f"unknown ShapeWorld version in {name!r}; choose from {list(WORLD_VERSIONS)}")
        return int(tail)
    return None


def attribute_names(version: int = WORLD_VERSION) -> dict[str, tuple[str, ...]]:
    """The value names of each attribute (shape, colour, size, position) in world ``version``;
    version 3's positions are its grid cells. Attribute index ``i`` of an object is
    ``attribute_names(v)[attr][i]``.

    Example:
        >>> attribute_names(3)["position"][4], attribute_names(2)["shape"]
        ('centre', ('circle', 'square', 'triangle', 'cross'))
    """
    return VERSIONS.get(version, v2).attribute_names()


def level_names(version: int = WORLD_VERSION) -> tuple[str, ...]:
    """The caption level names of world ``version``."""
    return VERSIONS.get(version, v2).LEVEL_NAMES


@dataclass
class WorldArrays:
    """The raw generated world (what :func:`generate` wraps into a ``datasets.Dataset``).

    Attributes:
        images: (N, H, W, 3) uint8.
        objects: (N, max_objects, 4) int attribute indices (shape, colour, size, position), -1
            for absent distractors; object 0 is the target.
        caption_style, visual_style: (N,) indices into the style tuples.
        specs: (N, L, W) int caption specs (attribute index, -1 = unspecified), one per level;
            W is the version's spec width (4 for version 2, 8 for version 3).
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
# captions and ground truth (the spec's width picks the version)
# ----------------------------------------------------------------------------------------------
def ambiguity(spec: Sequence[int]) -> float:
    """The ambiguity of a caption spec: version 2's number of attribute combinations consistent with
    it (an int), or version 3's exact probability that a generated scene satisfies it
    (:func:`asymvlm.worlds.shapeworld.v3.ambiguity`, up to 3 objects) for a version-3 spec.

    Example:
        >>> ambiguity([-1, 0, -1, -1])   # "a red object": 4 shapes x 2 sizes x 4 positions
        32
    """
    return _of_spec(spec).ambiguity(spec)


def ambiguities(specs: np.ndarray) -> np.ndarray:
    """Vectorised :func:`ambiguity` over the last axis of an (..., W) spec array."""
    return _of_spec(specs).ambiguities(specs)


def describe(spec: Sequence[int], style: str = "plain") -> str:
    """The caption text of a spec in a caption style.

    Example:
        >>> describe([0, 0, 0, 0]), describe([0, 0, 0, 0], "synonyms"), describe([-1, 0, -1, -1], "reordered")
        ('a small red circle in the top left', 'a tiny crimson disc at the upper left', 'an object, red')
    """
    return _of_spec(spec).describe(spec, style)


def consistency_matrix(specs: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """(T, I) bool: image i is consistent with caption t (some object of i satisfies every
    attribute the caption states; version 3: and its relation, or "alone").

    Args:
        specs: (T, W) caption specs (attribute indices, -1 = unspecified).
        objects: (I, K, 4) object attributes (-1 rows = absent), or (I, 4) for one object each.
    """
    specs = np.asarray(specs)
    return _of_spec(specs).consistency_matrix(specs, objects)


def vocabulary(version: int = WORLD_VERSION) -> list[str]:
    """Every word any caption style of world ``version`` can produce (for word-level tokenizers), sorted."""
    return VERSIONS.get(version, v2).vocabulary()


def level_ambiguity(version: int = WORLD_VERSION) -> dict[int, float]:
    """Mean ambiguity of each level (version 2: level 1 mixes colour-only and shape-only captions;
    version 3: the mean probability mass, :func:`asymvlm.worlds.shapeworld.v3.level_ambiguity`)."""
    return VERSIONS.get(version, v2).level_ambiguity()


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
    sizes, positions) of the world (default: the tables of ``config``'s version).
    """
    shapes, colours, sizes, positions = tables or VERSIONS[config.version].render_tables()
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
def generate_arrays(n: int, seed: int = 0, config: ShapeWorldConfig | None = None, **overrides: Any) -> WorldArrays:
    """Generate ``n`` images with captions as numpy arrays (deterministic in ``seed`` and config).

    One recipe for every version, from one generator in this order: the objects, the caption and
    visual styles, the rendering, the caption specs (the version module's ``sample_objects``,
    ``render_tables``, ``caption_specs`` and ``describe_cached``).
    """
    config = config or ShapeWorldConfig(**overrides)
    if overrides and config is not None and not isinstance(config, ShapeWorldConfig):
        raise TypeError("config must be a ShapeWorldConfig")
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    world = VERSIONS[config.version]
    rng = np.random.default_rng(seed)
    objects = world.sample_objects(n, config.max_objects, rng)
    caption_style = rng.integers(0, len(config.caption_styles), n)
    visual_style = rng.integers(0, len(config.visual_styles), n)
    images = render(objects, visual_style, config, rng, tables=world.render_tables())
    specs = world.caption_specs(objects, config.levels, rng)
    styles = config.caption_styles
    captions = [
        [world.describe_cached(tuple(int(v) for v in s), styles[caption_style[i]]) for s in specs[i]] for i in range(n)
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
    world = VERSIONS[w.config.version]
    names = world.attribute_names()

    def name(attr: str, idx: int) -> str:
        return names[attr][idx] if idx >= 0 else ""

    keys = list(names)
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
    extra_data, extra = world.dataset_columns(w.specs, name)  # version 3: the second object of level 5, "alone"
    data.update(extra_data)
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
            "caption_ambiguity": datasets.Sequence(datasets.Value(world.AMBIGUITY_DTYPE)),
            **{f"caption_{a}": datasets.Sequence(datasets.Value("string")) for a in keys},
            **extra,
        }
    )
    return datasets.Dataset.from_dict(data, features=features)


# ----------------------------------------------------------------------------------------------
# ground truth of a generated world
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
            raise InputError(f"{len(missing)} caption(s) are not this world's, e.g. {missing[0]!r}")
        if not captions:
            return []
        cm = consistency_matrix(np.stack([spec_of[c] for c in captions]), world.objects)
        return [np.flatnonzero(row) for row in cm]

    return truth
