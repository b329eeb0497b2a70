"""ShapeWorld version 2: one target object (and optionally distractors) per image, five caption levels.

Selected with ``version=2`` (:mod:`asymvlm.worlds.shapeworld`, whose functions dispatch here) so
that earlier results reproduce. Every image holds a *target* object with four attributes drawn
from finite sets: shape, colour, size and position (a quadrant). Every image gets one caption per
specificity level, from vague to exact:

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

Specs are int arrays of width :data:`SPEC_WIDTH` (-1 = unspecified): shape, colour, size,
position. The module has the same function names as :mod:`asymvlm.worlds.shapeworld.v3`
(``sample_objects``, ``caption_specs``, ``describe``, ``ambiguity``, ``consistency_matrix``, ...),
which is what lets the one ShapeWorld API pick a version from a table.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "ATTRIBUTES",
    "LEVELS",
    "LEVEL_NAMES",
    "SPEC_WIDTH",
    "DEFAULTS",
    "CELLS",
    "AMBIGUITY_DTYPE",
    "attribute_names",
    "render_tables",
    "sample_objects",
    "caption_spec",
    "caption_specs",
    "describe",
    "describe_cached",
    "ambiguity",
    "ambiguities",
    "consistency_matrix",
    "vocabulary",
    "spec_from_names",
    "level_ambiguity",
    "dataset_columns",
]

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
SPEC_WIDTH = 4
# the ShapeWorldConfig fields left at None take these
DEFAULTS = {"image_size": 32, "max_objects": 1, "levels": LEVELS, "position_jitter": 0.05}
CELLS = len(POSITIONS)  # places for objects: at most this many per scene
AMBIGUITY_DTYPE = "int64"  # of the dataset's caption_ambiguity column (a count of combinations)

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


def attribute_names() -> dict[str, tuple[str, ...]]:
    """The value names of each attribute (shape, colour, size, position)."""
    return dict(ATTRIBUTES)


def render_tables() -> tuple[Sequence[str], dict, dict, dict]:
    """(shapes, colours, sizes, positions) for :func:`asymvlm.worlds.shapeworld.render`."""
    return SHAPES, COLOURS, SIZES, POSITIONS


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
def sample_objects(n: int, max_objects: int, rng: np.random.Generator) -> np.ndarray:
    """(n, max_objects, 4) attribute indices: 1..max_objects objects (uniform) in distinct quadrants,
    -1 rows for absent ones; object 0 is the target."""
    k = max_objects
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


def caption_specs(objects: np.ndarray, levels: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """(N, L, 4) specs of the target (object 0) at each level, vectorised (level 1 states the
    colour or the shape, a coin flip per image)."""
    n = objects.shape[0]
    colour_not_shape = rng.random(n) < 0.5
    specs = np.full((n, len(levels), 4), -1, dtype=np.int64)
    target = objects[:, 0]
    for j, lv in enumerate(levels):
        keep = np.zeros((n, 4), dtype=bool)
        keep[:, : {0: 0, 1: 0, 2: 2, 3: 3, 4: 4}[lv]] = True
        if lv == 1:
            keep[:, 1] = colour_not_shape
            keep[:, 0] = ~colour_not_shape
        specs[:, j] = np.where(keep, target, -1)
    return specs


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------
def ambiguity(spec: Sequence[int]) -> int:
    """Number of attribute combinations consistent with a caption spec.

    Example:
        >>> ambiguity([-1, 0, -1, -1])   # "a red object": 4 shapes x 2 sizes x 4 positions
        32
    """
    sizes = [len(v) for v in ATTRIBUTES.values()]
    return int(np.prod([n for n, s in zip(sizes, spec) if s < 0]))


def ambiguities(specs: np.ndarray) -> np.ndarray:
    """Vectorised :func:`ambiguity` over the last axis of an (..., 4) spec array."""
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
def describe_cached(spec: tuple[int, ...], style: str) -> str:
    """:func:`describe` of a tuple spec, memoised (generation describes the same specs many times)."""
    return describe(spec, style)


def vocabulary() -> list[str]:
    """Every word any caption style can produce (for word-level tokenizers), sorted."""
    words = {"a", "an", "the", "in", "at", "of", "photo", "object", ","}
    for values in ATTRIBUTES.values():
        for v in values:
            words.update(v.split())
    for k, v in SYNONYMS.items():
        words.update(k.split())
        words.update(v.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------
# ground truth
# ----------------------------------------------------------------------------------------------
def consistency_matrix(specs: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """(T, I) bool: image i is consistent with caption t (some object of i satisfies every
    attribute the caption states).

    Args:
        specs: (T, 4) caption specs (attribute indices, -1 = unspecified).
        objects: (I, K, 4) object attributes (-1 rows = absent), or (I, 4) for one object each.
    """
    specs = np.asarray(specs)
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


def level_ambiguity() -> dict[int, float]:
    """Mean ambiguity of each level (level 1 mixes colour-only and shape-only captions)."""
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


def dataset_columns(specs: np.ndarray, name: Any) -> tuple[dict[str, list], dict[str, Any]]:
    """The dataset columns (and their features) of this version beyond the common ones: none."""
    return {}, {}
