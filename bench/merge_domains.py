"""Merging on domains the encoder never saw: a diagnosis for the demo's merging step (issue 15).

The demo's experts gain almost nothing over their base because the v3 toy CLIP is trained on every
caption style: a head on its frozen embeddings has nothing left to learn per style. This benchmark
builds (or reuses) a v3 toy CLIP trained on ``--clip_styles`` only, trains the demo's base head
(learned mean, 8,000 images) on ``--base_styles``, one expert per ``--domains`` style (the demo's
domain splits: validation and test on the specific levels 4 and 5) and the task-arithmetic, TIES
and DARE-TIES merges with lambda chosen on validation, and prints exact t2i R@1 per domain for the
base, each expert and each merge (normalised = merge / expert). Not part of ``make bench``
(minutes: the toy CLIP build is about 4 minutes, then about 1 minute per expert setting).

Run:  python bench/merge_domains.py --expert_lr 1e-3 --expert_steps 80,200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip_styles", default="plain", help="Caption styles the toy CLIP is trained on.")
    p.add_argument("--base_styles", default="plain", help="Caption styles of the base head's training split.")
    p.add_argument("--domains", default="photo,synonyms,reordered", help="One expert per caption style.")
    p.add_argument("--expert_steps", default="80,200", help="Comma-separated expert step counts to compare.")
    p.add_argument("--expert_lr", type=float, default=1e-3, help="AdamW lr of the experts (the demo's: 1e-3).")
    p.add_argument("--out", default="bench-out/merge-domains")
    args = p.parse_args(argv)

    from asymvlm.config import DataArguments
    from asymvlm.encoders import load_encoder
    from asymvlm.merging.api import merge
    from asymvlm.model import AsymVLM
    from asymvlm.training import demo, demo_steps
    from asymvlm.worlds.data import cache_for_config
    from asymvlm.worlds.toyclip import ToyCLIPRecipe, cache_root, ensure_toy_clip

    recipe = ToyCLIPRecipe(world_version=3, caption_styles=tuple(args.clip_styles.split(",")))
    t = time.time()
    clip_dir = ensure_toy_clip(recipe, progress=False)
    print(f"toy CLIP {recipe.fingerprint()} (caption styles {args.clip_styles}): {time.time() - t:.0f} s", flush=True)
    spec = f"open_clip:local-dir:{clip_dir}"
    enc = load_encoder(spec, device="cpu")
    settings = demo._settings(
        argparse.Namespace(
            quick=False, train_images=None, eval_images=None, steps=None, rounds=None, clients=8, world=3
        )
    )
    doms = tuple(args.domains.split(","))
    domains = demo_steps.domain_caches(enc, settings["domain_images"], 1, cache_root() / "caches", 3, doms)
    base_cache = cache_for_config(
        DataArguments(
            dataset="shapeworld:3", encoder=spec, pretrained="", train_images=settings["train_images"],
            data_seed=0, caption_styles=args.base_styles,
        ),
        enc,
    )  # fmt: skip
    out = Path(args.out) / recipe.fingerprint()
    base = demo_steps.train_head(base_cache.path, out / "base", settings, "vmf", 0, direction="learned", progress=False)

    def r1(model_dir: Path) -> dict[str, float]:
        head = AsymVLM.from_pretrained(model_dir, load_encoder=False).head
        return {d: demo_steps._r1(head, domains[d]["test"]) for d in doms}

    base_r1 = r1(base)
    rows = [("base", "", base_r1)]
    for steps in (int(x) for x in args.expert_steps.split(",")):
        experts = []
        for d in doms:
            experts.append(
                demo_steps.train_head(
                    domains[d]["train"], out / f"expert-{steps}-{args.expert_lr:g}-{d}", settings, "vmf", 0,
                    init_from=str(base), steps=steps, lr=args.expert_lr, direction="learned", progress=False,
                )
            )  # fmt: skip
        own = {d: r1(e)[d] for d, e in zip(doms, experts)}
        rows.append((f"experts ({steps} steps, lr {args.expert_lr:g})", "", own))
        val = [domains[d]["val"] for d in doms]
        for name, method, opts in (
            ("task arithmetic", "task_arithmetic", {}),
            ("TIES", "ties", {"density": 0.2}),
            ("DARE-TIES", "dare_ties", {"p": 0.9, "seed": 0}),
        ):
            target = out / f"merge-{steps}-{args.expert_lr:g}-{method}"
            rep = merge(base, experts, target, method, lam_grid=[0.25, 0.5, 0.75, 1.0], val=val, on_flat="warn", **opts)
            got = r1(target)
            norm = sum(got[d] / own[d] for d in doms if own[d] > 0) / max(1, sum(own[d] > 0 for d in doms))
            rows.append((f"  {name}", f"lam {rep['lam']}, normalised {norm:.3f}", got))
    print()
    print("| model | " + " | ".join(doms) + " | |")
    print("|---|" + "---|" * len(doms) + "---|")
    for name, extra, vals in rows:
        print(f"| {name} | " + " | ".join(f"{vals[d]:.3f}" for d in doms) + f" | {extra} |")
    print("\nexact t2i R@1 on each domain's test split (400 images, captions of levels 4 and 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
