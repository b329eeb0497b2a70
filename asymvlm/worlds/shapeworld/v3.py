"""ShapeWorld version 3: scenes of 1-3 objects on a 3x3 grid, captions up to a relation between two.

Version 2 (:mod:`asymvlm.worlds.shapeworld.v2`, ``version=2``) has 192 single-object scenes, so about five of
1,000 images share every attribute and its most specific caption cannot single one out. Version 3
has six shapes, eight colours, two sizes and nine cells, one to three objects per scene in distinct
cells (uniform), and six caption levels about the *target* (object 0):

=====  ===============================  ===================================================
level  name                             example
=====  ===============================  ===================================================
0      object                           "an object"
1      colour or shape                  "a red object" / "a circle"
2      colour shape                     "a red circle"
3      size colour shape                "a small red circle"
4      + position                       "a small red circle in the top left"
5      + a second object, or alone      "a small red circle in the top left, left of a blue
                                        square" / "..., alone"
=====  ===============================  ===================================================

A caption is true of a scene when *some* object satisfies it (a bag-of-words reader that sees
"red" and "circle" in a scene with a red square and a blue circle is wrong: colour-shape binding),
and, at level 5, another object of the stated colour and shape stands in the stated relation to it
("left of": strictly smaller column; "above": strictly smaller row), or the scene has no other
object ("alone").

A caption's *ambiguity* is the exact probability that a scene drawn from the generator satisfies
it (:func:`ambiguity`, derived in its docstring and checked against brute-force enumeration of
small worlds in the tests). The expected number of a gallery's images it is true of is
``1 + (N - 1) * ambiguity`` for its own image's caption.

Specs are int arrays of width :data:`SPEC_WIDTH` (-1 = unspecified): shape, colour, size, cell,
relation (index into :data:`RELATIONS`), the second object's shape and colour, alone (1 or -1).
The module has the same function names as :mod:`asymvlm.worlds.shapeworld.v2` (``sample_objects``,
``caption_specs``, ``describe``, ``ambiguity``, ``consistency_matrix``, ...), which is what lets the
one ShapeWorld API (:mod:`asymvlm.worlds.shapeworld`) pick a version from a table.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asymvlm.errors import InputError

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "RELATIONS",
    "LEVELS",
    "LEVEL_NAMES",
    "SPEC_WIDTH",
    "World",
    "DEFAULT_WORLD",
    "DEFAULTS",
    "CELLS",
    "AMBIGUITY_DTYPE",
    "attribute_names",
    "render_tables",
    "caption_specs",
    "sample_objects",
    "describe",
    "ambiguity",
    "ambiguities",
    "consistency_matrix",
    "vocabulary",
    "level_ambiguity",
    "describe_cached",
    "dataset_columns",
]

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLOURS = {
    "red": (220, 45, 45),
    "orange": (245, 145, 30),
    "yellow": (235, 215, 50),
    "green": (45, 185, 70),
    "cyan": (50, 205, 215),
    "blue": (50, 90, 230),
    "purple": (155, 65, 200),
    "pink": (245, 135, 195),
}
SIZES = {"small": 0.085, "big": 0.14}  # radius as a fraction of the image side (a cell is 1/3)
RELATIONS = ("left of", "right of", "above", "below")
LEVELS = (0, 1, 2, 3, 4, 5)
LEVEL_NAMES = (
    "object",
    "colour or shape",
    "colour shape",
    "size colour shape",
    "size colour shape position",
    "with a second object, or alone",
)
SPEC_WIDTH = 8
SHAPE, COLOUR, SIZE, CELL, REL, SHAPE2, COLOUR2, ALONE = range(SPEC_WIDTH)

SYNONYMS = {
    "small": "tiny",
    "big": "large",
    "red": "crimson",
    "orange": "amber",
    "yellow": "golden",
    "green": "lime",
    "cyan": "teal",
    "blue": "navy",
    "purple": "violet",
    "pink": "rose",
    "circle": "disc",
    "square": "box",
    "triangle": "wedge",
    "cross": "plus",
    "diamond": "rhombus",
    "ring": "hoop",
    "object": "thing",
    "top": "upper",
    "bottom": "lower",
    "middle": "mid",
    "centre": "center",
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "over",
    "below": "under",
    "alone": "by itself",
}


@dataclass(frozen=True)
class World:
    """The attribute tables and the grid (small worlds make exact enumeration possible in tests)."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    rows: int = 3
    cols: int = 3
    row_names: tuple[str, ...] = field(default=("top", "middle", "bottom"))
    col_names: tuple[str, ...] = field(default=("left", "middle", "right"))

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    def cell_name(self, cell: int) -> str:
        r, c = divmod(int(cell), self.cols)
        row, col = self.row_names[r], self.col_names[c]
        return "centre" if row == col == "middle" else f"{row} {col}"

    def cell_names(self) -> tuple[str, ...]:
        return tuple(self.cell_name(c) for c in range(self.cells))

    def centres(self) -> dict[str, tuple[float, float]]:
        """Cell name -> (x, y) centre as fractions of the image side."""
        return {
            self.cell_name(c): ((c % self.cols + 0.5) / self.cols, (c // self.cols + 0.5) / self.rows)
            for c in range(self.cells)
        }

    def relation_holds(self, rel: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Whether RELATIONS[rel] holds from cell ``a`` to cell ``b`` (broadcast)."""
        ra, ca = np.divmod(a, self.cols)
        rb, cb = np.divmod(b, self.cols)
        return np.select([rel == 0, rel == 1, rel == 2, rel == 3], [ca < cb, ca > cb, ra < rb, ra > rb], False)


DEFAULT_WORLD = World()
# the ShapeWorldConfig fields left at None take these
DEFAULTS = {"image_size": 48, "max_objects": 3, "levels": LEVELS, "position_jitter": 0.03}
CELLS = DEFAULT_WORLD.cells  # places for objects: at most this many per scene
AMBIGUITY_DTYPE = "float64"  # of the dataset's caption_ambiguity column (a probability)


def attribute_names() -> dict[str, tuple[str, ...]]:
    """The value names of each attribute (shape, colour, size, position: the grid cells)."""
    w = DEFAULT_WORLD
    return {"shape": w.shapes, "colour": w.colours, "size": w.sizes, "position": w.cell_names()}


def render_tables() -> tuple[tuple[str, ...], dict, dict, dict]:
    """(shapes, colours, sizes, cell centres) for :func:`asymvlm.worlds.shapeworld.render`."""
    return DEFAULT_WORLD.shapes, COLOURS, SIZES, DEFAULT_WORLD.centres()


# ----------------------------------------------------------------------------------------------
# exact ambiguity
# ----------------------------------------------------------------------------------------------
def ambiguity(spec: Any, max_objects: int = 3, world: World = DEFAULT_WORLD) -> float:
    """P(a scene from the generator satisfies the caption spec), exactly.

    Scenes: n ~ uniform{1..max_objects} objects in a uniformly random n-subset of the G cells,
    shape, colour and size independent and uniform. Let p be the probability that one object
    matches the stated shape/colour/size (the product of 1/|A| over the stated attributes).

    * no cell stated: P = E_n[1 - (1 - p)^n] (some object matches; objects are independent);
    * cell c stated: P = E_n[(n / G) p] (c is occupied with probability n/G, by one object);
    * alone: P = P(n = 1) p / G;
    * relation to a second object of colour/shape matching with probability q: given the target
      in c, the other n - 1 objects fill a uniform (n - 1)-subset of the other G - 1 cells, of
      which r satisfy the relation; the number m of them in those r cells is hypergeometric and
      each matches independently: P = E_n[(n / G) p (1 - E_m[(1 - q)^m])].

    Example:
        >>> round(ambiguity([-1] * 8), 12)   # "an object"
        1.0
    """
    return _ambiguity(tuple(int(v) for v in spec), int(max_objects), world)


@functools.cache
def _ambiguity(spec: tuple[int, ...], max_objects: int, world: World) -> float:
    if len(spec) != SPEC_WIDTH:
        raise InputError(f"a version-3 spec has {SPEC_WIDTH} entries, got {len(spec)}")
    g = world.cells
    if not 1 <= max_objects <= g:
        raise InputError(f"max_objects must be in [1, {g}], got {max_objects}")
    counts = (len(world.shapes), len(world.colours), len(world.sizes))
    p = math.prod(1.0 / n for n, v in zip(counts, spec[:3]) if v >= 0)
    pn = 1.0 / max_objects
    ns = range(1, max_objects + 1)
    cell, rel, alone = spec[CELL], spec[REL], spec[ALONE]
    if cell < 0:
        if rel >= 0 or alone >= 0:
            raise InputError("a relation or 'alone' needs the target's cell")
        return sum(pn * (1.0 - (1.0 - p) ** n) for n in ns)
    if alone >= 0:
        return pn * p / g
    if rel < 0:
        return sum(pn * n / g * p for n in ns)
    q = math.prod(1.0 / n for n, v in zip(counts[:2], (spec[SHAPE2], spec[COLOUR2])) if v >= 0)
    r = int(world.relation_holds(np.int64(rel), np.int64(cell), np.arange(g)).sum())
    total = 0.0
    for n in ns:
        k = n - 1  # other objects, a uniform k-subset of the other g - 1 cells, r of them related
        none = sum(
            math.comb(r, m) * math.comb(g - 1 - r, k - m) / math.comb(g - 1, k) * (1.0 - q) ** m
            for m in range(0, min(r, k) + 1)
        )
        total += pn * n / g * p * (1.0 - none)
    return total


def ambiguities(specs: np.ndarray, max_objects: int = 3, world: World = DEFAULT_WORLD) -> np.ndarray:
    """:func:`ambiguity` over the last axis of an (..., SPEC_WIDTH) array (float64)."""
    specs = np.asarray(specs)
    flat = specs.reshape(-1, SPEC_WIDTH)
    out = np.array([_ambiguity(tuple(int(v) for v in s), int(max_objects), world) for s in flat])
    return out.reshape(specs.shape[:-1])


def level_ambiguity(max_objects: int = 3, n: int = 20000, seed: int = 0) -> dict[int, float]:
    """Mean ambiguity of each level over ``n`` generated scenes (a fixed seed: deterministic)."""
    rng = np.random.default_rng(seed)
    objects = sample_objects(n, max_objects, rng)
    specs = caption_specs(objects, LEVELS, rng)
    amb = ambiguities(specs, max_objects)
    return {lv: float(amb[:, j].mean()) for j, lv in enumerate(LEVELS)}


# ----------------------------------------------------------------------------------------------
# ground truth
# ----------------------------------------------------------------------------------------------
def consistency_matrix(specs: np.ndarray, objects: np.ndarray, world: World = DEFAULT_WORLD) -> np.ndarray:
    """(T, I) bool: caption t is true of image i (the semantics of the module docstring).

    Args:
        specs: (T, SPEC_WIDTH) caption specs.
        objects: (I, K, 4) object attributes (shape, colour, size, cell; -1 rows = absent).
    """
    specs = np.asarray(specs)
    objects = np.asarray(objects)
    if objects.ndim == 2:
        objects = objects[:, None, :]
    s = specs[:, None, None, :]  # (T, 1, 1, W)
    o = objects[None]  # (1, I, K, 4)
    present = o[..., 0] >= 0  # (1, I, K)
    target = present & ((s[..., :4] < 0) | (s[..., :4] == o)).all(-1)  # (T, I, K)
    out = target.any(-1)
    alone = specs[:, ALONE] >= 0
    if alone.any():
        single = present.sum(-1) == 1  # (1, I)
        out = np.where(alone[:, None], out & single, out)
    rel = specs[:, REL]
    if (rel >= 0).any():
        second = present & ((s[..., [SHAPE2, COLOUR2]] < 0) | (s[..., [SHAPE2, COLOUR2]] == o[..., [0, 1]])).all(-1)
        related = world.relation_holds(
            rel[:, None, None, None], objects[None, :, :, None, 3], objects[None, :, None, :, 3]
        )  # (T, I, K, K'): object k (target) to object k'
        k = objects.shape[1]
        distinct = ~np.eye(k, dtype=bool)
        pair = target[..., :, None] & second[..., None, :] & related & distinct
        out = np.where((rel >= 0)[:, None], pair.any((-1, -2)), out)
    return out


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
def sample_objects(n: int, max_objects: int, rng: np.random.Generator, world: World = DEFAULT_WORLD) -> np.ndarray:
    """(n, max_objects, 4) attribute indices (shape, colour, size, cell): 1..max_objects objects
    (uniform) in distinct cells, -1 rows for absent ones; object 0 is the target."""
    objects = np.full((n, max_objects, 4), -1, dtype=np.int64)
    for a, c in enumerate((len(world.shapes), len(world.colours), len(world.sizes))):
        objects[:, :, a] = rng.integers(0, c, (n, max_objects))
    objects[:, :, 3] = np.argsort(rng.random((n, world.cells)), axis=1)[:, :max_objects]
    n_obj = rng.integers(1, max_objects + 1, n)
    objects[np.arange(max_objects)[None, :] >= n_obj[:, None]] = -1
    return objects


def caption_specs(
    objects: np.ndarray, levels: tuple[int, ...], rng: np.random.Generator, world: World = DEFAULT_WORLD
) -> np.ndarray:
    """(N, L, SPEC_WIDTH) specs of the target (object 0) at each level. Level 1 states the colour or
    the shape (a coin flip); level 5 relates the target to a uniformly chosen other object by a
    uniformly chosen relation that holds, or says "alone" when there is none."""
    n = objects.shape[0]
    target = objects[:, 0]
    colour_not_shape = rng.random(n) < 0.5
    present = objects[:, :, 0] >= 0
    n_obj = present.sum(1)
    # level 5: the other object and the relation (drawn for every scene, used where n > 1)
    other = 1 + np.floor(rng.random(n) * np.maximum(n_obj - 1, 1)).astype(np.int64)
    other_obj = objects[np.arange(n), np.minimum(other, objects.shape[1] - 1)]
    valid = np.stack(
        [world.relation_holds(np.int64(r), target[:, 3], other_obj[:, 3]) for r in range(len(RELATIONS))], 1
    )
    pick = rng.random(n)
    cum = np.cumsum(valid, 1)
    rel = np.argmax(cum > (pick * np.maximum(cum[:, -1], 1))[:, None], axis=1)
    specs = np.full((n, len(levels), SPEC_WIDTH), -1, dtype=np.int64)
    for j, lv in enumerate(levels):
        keep = np.zeros((n, 4), dtype=bool)
        keep[:, : {0: 0, 1: 0, 2: 2, 3: 3, 4: 4, 5: 4}[lv]] = True
        if lv == 1:
            keep[:, 1] = colour_not_shape
            keep[:, 0] = ~colour_not_shape
        specs[:, j, :4] = np.where(keep, target, -1)
        if lv == 5:
            multi = n_obj > 1
            specs[:, j, ALONE] = np.where(multi, -1, 1)
            specs[:, j, REL] = np.where(multi, rel, -1)
            specs[:, j, SHAPE2] = np.where(multi, other_obj[:, 0], -1)
            specs[:, j, COLOUR2] = np.where(multi, other_obj[:, 1], -1)
    return specs


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(spec: Any, style: str = "plain", world: World = DEFAULT_WORLD) -> str:
    """The caption text of a version-3 spec in a caption style (``plain``, ``photo``, ``synonyms``,
    ``reordered``).

    Example:
        >>> describe([0, 0, 0, 0, 0, 1, 5, -1])
        'a small red circle in the top left, left of a blue square'
        >>> describe([0, 0, 0, 4, -1, -1, -1, 1], "synonyms")
        'a tiny crimson disc at the center, by itself'
    """
    spec = [int(v) for v in spec]
    if len(spec) != SPEC_WIDTH:
        raise InputError(f"a version-3 spec has {SPEC_WIDTH} entries, got {len(spec)}")
    syn = style == "synonyms"

    def word(w: str | None) -> str | None:
        if w is None or not syn:
            return w
        return SYNONYMS.get(w) or " ".join(SYNONYMS.get(p, p) for p in w.split())

    shape = word(world.shapes[spec[SHAPE]]) if spec[SHAPE] >= 0 else None
    colour = word(world.colours[spec[COLOUR]]) if spec[COLOUR] >= 0 else None
    size = word(world.sizes[spec[SIZE]]) if spec[SIZE] >= 0 else None
    where = None
    if spec[CELL] >= 0:
        where = f"{'at' if syn else 'in'} the {word(world.cell_name(spec[CELL]))}"
    tail = None
    if spec[ALONE] >= 0:
        tail = word("alone")
    elif spec[REL] >= 0:
        s2 = word(world.shapes[spec[SHAPE2]]) if spec[SHAPE2] >= 0 else word("object")
        c2 = word(world.colours[spec[COLOUR2]]) if spec[COLOUR2] >= 0 else None
        second = " ".join(w for w in (c2, s2) if w)
        tail = f"{word(RELATIONS[spec[REL]])} {_article(second)} {second}"
    noun = shape or word("object")
    if style == "reordered":
        return ", ".join([f"{_article(noun)} {noun}", *(w for w in (colour, size, where, tail) if w)])
    words = [w for w in (size, colour, noun) if w]
    text = f"{_article(words[0])} {' '.join(words)}"
    if where:
        text += f" {where}"
    if tail:
        text += f", {tail}"
    return f"a photo of {text}" if style == "photo" else text


@functools.cache
def describe_cached(spec: tuple[int, ...], style: str) -> str:
    """:func:`describe` of a tuple spec, memoised (generation describes the same specs many times)."""
    return describe(spec, style)


def vocabulary(world: World = DEFAULT_WORLD) -> list[str]:
    """Every word any version-3 caption style can produce, sorted."""
    words = {"a", "an", "the", "in", "at", "of", "photo", "object", ",", "to"}
    for values in (world.shapes, world.colours, world.sizes, world.cell_names(), RELATIONS, ("alone",)):
        for v in values:
            words.update(v.split())
    for k, v in SYNONYMS.items():
        words.update(k.split())
        words.update(v.split())
    return sorted(words)


def dataset_columns(specs: np.ndarray, name: Any) -> tuple[dict[str, list], dict[str, Any]]:
    """The dataset columns of this version beyond the common ones (the second object of level 5 and
    "alone"), and their ``datasets`` features; ``name(attr, index)`` is an attribute's value name."""
    import datasets

    rel = ["", *RELATIONS]
    data = {
        "caption_relation": [[rel[int(s[REL]) + 1] for s in spec] for spec in specs],
        "caption_shape2": [[name("shape", int(s[SHAPE2])) for s in spec] for spec in specs],
        "caption_colour2": [[name("colour", int(s[COLOUR2])) for s in spec] for spec in specs],
        "caption_alone": [[bool(s[ALONE] > 0) for s in spec] for spec in specs],
    }
    features = {
        **{
            c: datasets.Sequence(datasets.Value("string"))
            for c in ("caption_relation", "caption_shape2", "caption_colour2")
        },
        "caption_alone": datasets.Sequence(datasets.Value("bool")),
    }
    return data, features
