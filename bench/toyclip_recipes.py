"""Toy CLIP recipes on ShapeWorld v3: build time and retrieval per caption level, one recipe per run.

Builds the v3 toy CLIP with the recipe's defaults overridden by ``--recipe`` (JSON of
:class:`asymvlm.worlds.toyclip.ToyCLIPRecipe` fields) into ``--out`` (a folder per recipe fingerprint,
reused when present), then evaluates it on 1,000 held-out v3 images of every visual style with
``asymvlm.eval``, once with the caption styles it was trained on and once with the ones it never
saw (v3's default recipe is trained on ``plain`` captions only): exact t2i R@1, i2t R@1
(captions of one level, identical texts as one) and consistent t2i R@1 per level.
Not part of ``make bench`` (minutes per recipe).

Run:  python bench/toyclip_recipes.py --recipe '{"steps": 2000}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="{}", help="JSON overrides of ToyCLIPRecipe fields (world_version is 3).")
    p.add_argument("--out", default="bench-out/toyclip-v3")
    p.add_argument("--images", type=int, default=1000)
    args = p.parse_args(argv)
    from asymvlm.encoders import load_encoder
    from asymvlm.eval.benchmark import evaluate, shapeworld_eval_data
    from asymvlm.worlds import shapeworld as sw
    from asymvlm.worlds import toyclip

    recipe = toyclip.ToyCLIPRecipe(**{**json.loads(args.recipe), "world_version": 3})
    directory = Path(args.out) / recipe.fingerprint()
    start = time.time()
    if not (directory / "open_clip_config.json").is_file():
        toyclip.build_toy_clip(directory, recipe, progress=True)
    built = json.loads((directory / "recipe.json").read_text())["build_seconds"]
    enc = load_encoder(f"open_clip:{directory}", device="cpu")
    unseen = tuple(c for c in sw.CAPTION_STYLES if c not in recipe.caption_styles)
    groups = {"trained caption styles": recipe.caption_styles, **({"unseen styles": unseen} if unseen else {})}
    print(f"recipe {args.recipe} -> {directory} (build {built:.0f} s; trained on {', '.join(recipe.caption_styles)})")
    for label, styles in groups.items():
        world = dict(caption_styles=styles, visual_styles=sw.VISUAL_STYLES, version=3)
        data = shapeworld_eval_data(enc, n=args.images, seed=12345, **world)
        m = evaluate(data, {})["clip"]
        levels = sorted(set(data.levels.tolist()))
        print(f"{label} ({', '.join(styles)}), {args.images} images:")
        for key in ("t2i_R@1", "i2t_R@1", "consistent_t2i_R@1"):
            print(f"{key:>20} by level: " + " / ".join(f"{m[f'{key}_level{lv}']:.3f}" for lv in levels))
    print(f"this run {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
