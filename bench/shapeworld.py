"""ShapeWorld generation speed: the vectorised generator vs a naive per-image PIL renderer.

Prints images/s for (a) a straightforward baseline drawing each image with ``PIL.ImageDraw``
(same attributes, no captions), (b) ``generate_arrays`` (numpy images + captions) and (c)
``generate`` (a ``datasets.Dataset`` with PNG-encoded images), all styles, in one process.

Run:  python bench/shapeworld.py [--images 20000] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import Results
from PIL import Image, ImageDraw

from asymvlm.worlds import shapeworld as sw


def naive(n: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    colours = list(sw.COLOURS.values())
    radii = list(sw.SIZES.values())
    centres = list(sw.POSITIONS.values())
    out = []
    for _ in range(n):
        shape, colour, s, p = (int(rng.integers(len(v))) for v in sw.ATTRIBUTES.values())
        im = Image.new("RGB", (size, size), (28, 28, 28))
        d = ImageDraw.Draw(im)
        r = radii[s] * size
        cx, cy = centres[p][0] * size, centres[p][1] * size
        fill = colours[colour]
        if shape == 0:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == 1:
            d.rectangle([cx - 0.82 * r, cy - 0.82 * r, cx + 0.82 * r, cy + 0.82 * r], fill=fill)
        elif shape == 2:
            d.polygon([(cx, cy - r), (cx - 1.08 * r, cy + 0.75 * r), (cx + 1.08 * r, cy + 0.75 * r)], fill=fill)
        else:
            d.rectangle([cx - 0.32 * r, cy - r, cx + 0.32 * r, cy + r], fill=fill)
            d.rectangle([cx - r, cy - 0.32 * r, cx + r, cy + 0.32 * r], fill=fill)
        out.append(im)
    return out


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="images per method (default 20000; quick 2000)")
    parser.add_argument("--quick", action="store_true", help="2000 images")
    parser.add_argument("--json", default=None, help="write the result rows to this JSON file")
    args = parser.parse_args(argv)
    n = args.images or (2000 if args.quick else 20000)
    styles = {"caption_styles": sw.CAPTION_STYLES, "visual_styles": sw.VISUAL_STYLES}
    base = rate(lambda: naive(n), n)
    arrays = rate(lambda: sw.generate_arrays(n, seed=0, **styles), n)
    dataset = rate(lambda: sw.generate(n, seed=0, **styles), n)
    print(f"{n} images, 32x32, all styles")
    print(f"  naive PIL.ImageDraw (images only)     {base:>10.0f} images/s   1.00x")
    print(f"  generate_arrays (images + captions)   {arrays:>10.0f} images/s   {arrays / base:.2f}x")
    print(f"  generate (datasets.Dataset, PNG)      {dataset:>10.0f} images/s   {dataset / base:.2f}x")
    results = Results("shapeworld", "ShapeWorld generation: vectorised generator vs a naive per-image PIL renderer")
    inputs = f"{n} images, 32x32, all styles"
    base_label = "naive PIL.ImageDraw (images only)"
    results.add(
        f"generate_arrays (images + captions) vs {base_label}",
        arrays,
        base,
        "images/s",
        higher_is_better=True,
        inputs=inputs,
    )
    results.add(
        f"generate (datasets.Dataset, PNG) vs {base_label}",
        dataset,
        base,
        "images/s",
        higher_is_better=True,
        inputs=inputs,
    )
    results.note("One timed run per method (no repeat); the baseline draws images only, ours also writes captions.")
    results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
