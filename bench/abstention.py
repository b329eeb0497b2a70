"""Does the service withhold the answers it would get wrong? ``asymvlm-serve --demo``'s abstention,
measured on queries it has never seen (issue 25).

The demo's model and gallery (``asymvlm.training.demo.prepare_demo``: the central vMF head over 1,000
held-out ShapeWorld v3 scenes, ``p_correct`` calibrated on the gallery's own captions against the
world's ground truth) answer the captions of fresh ShapeWorld scenes, every caption level, in the
style the model trained on (plain) and in styles it never saw (photo, synonyms, reordered), plus a
few sentences about things the world does not hold. An answer is right when its best image satisfies
the query (ShapeWorld's consistency against the gallery's scenes; the foreign sentences are never
right). For each abstention rule side by side: the fraction of answers kept and how often the kept
ones are right, against how often all answers are right.

Usage::

    python bench/abstention.py                      # the demo's model (demo-out, trained if missing)
    python bench/abstention.py --quick              # the --quick demo (smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FOREIGN = [  # queries about things ShapeWorld does not hold: never right
    "a photo of a dog on a beach",
    "two people riding bicycles in the rain",
    "a bowl of noodles with chopsticks",
    "the skyline of a city at night",
    "a cat sleeping on a laptop keyboard",
    "an airplane above the clouds",
    "a plate of sushi",
    "children playing football in a park",
]
RULES = ("none", "p_correct:0.5", "p_correct:0.8", "uncertainty:q80", "uncertainty:q50")


def queries(n: int, seed: int, world: int) -> tuple[list[str], list[str], list[Any]]:
    """(texts, group per text, spec per text or None): captions of ``n`` fresh scenes per style."""
    from asymvlm.worlds import shapeworld as sw

    texts, groups, specs = [], [], []
    for style in sw.CAPTION_STYLES:
        w = sw.generate_arrays(n, seed=seed, version=world, caption_styles=(style,))
        for caps, sp in zip(w.captions, w.specs):
            for level, (c, s) in enumerate(zip(caps, sp)):
                texts.append(c)
                groups.append(f"{style} L{level}")
                specs.append(s)
    texts += FOREIGN
    groups += ["foreign"] * len(FOREIGN)
    specs += [None] * len(FOREIGN)
    return texts, groups, specs


def run(args: argparse.Namespace) -> dict[str, Any]:
    from asymvlm.model import AsymVLM
    from asymvlm.serve.gallery import Gallery
    from asymvlm.serve.service import RetrievalService, TextQuery
    from asymvlm.training.demo import prepare_demo
    from asymvlm.training.serve import DEMO_GALLERY_IMAGES, DEMO_GALLERY_SEED
    from asymvlm.worlds import shapeworld as sw
    from asymvlm.worlds.toyclip import TOY_CLIP_SPECS

    torch.set_num_threads(args.threads)
    start = time.time()
    model_dir, gallery_dir = prepare_demo(args.demo_dir, quick=args.quick, progress=not args.no_progress)
    model = AsymVLM.from_pretrained(model_dir)
    gallery = Gallery.open(gallery_dir)
    world = next((v for v, spec in TOY_CLIP_SPECS.items() if model.encoder.spec == spec), sw.WORLD_VERSION)
    scenes = sw.generate_arrays(
        DEMO_GALLERY_IMAGES, seed=DEMO_GALLERY_SEED, version=world, visual_styles=sw.VISUAL_STYLES,
        caption_styles=("plain",),
    )  # fmt: skip
    texts, groups, specs = queries(args.scenes, args.seed, world)
    out: dict[str, Any] = {"type": "asymvlm.abstention_bench", "queries": len(texts), "rules": {}}
    for rule in RULES:
        t = time.time()
        with torch.no_grad():
            svc = RetrievalService(model, gallery, abstain=rule)
            answers = svc.search_text([TextQuery(texts, k=1)])[0]
        rows = np.array([a.hits[0].row for a in answers])
        right = np.zeros(len(texts), dtype=bool)
        known = [i for i, s in enumerate(specs) if s is not None]
        cm = sw.consistency_matrix(np.stack([specs[i] for i in known]), scenes.objects)
        right[known] = cm[np.arange(len(known)), rows[known]]
        kept = ~np.array([a.abstained for a in answers])
        per_group = {}
        for g in dict.fromkeys(groups):
            m = np.array([x == g for x in groups])
            per_group[g] = {
                "count": int(m.sum()),
                "right": float(right[m].mean()),
                "kept": float(kept[m].mean()),
                "right_kept": float(right[m & kept].mean()) if (m & kept).any() else None,
            }
        out["rules"][rule] = {
            "kept": float(kept.mean()),
            "right_all": float(right.mean()),
            "right_kept": float(right[kept].mean()) if kept.any() else None,
            "right_withheld": float(right[~kept].mean()) if (~kept).any() else None,
            "groups": per_group,
            "seconds": round(time.time() - t, 1),
        }
        if rule == "p_correct:0.5":
            p = np.array([a.confidence.p_correct for a in answers], dtype=float)
            out["calibration"] = svc.info()["calibration"]
            out["mean_p_correct"] = float(p.mean())
            bins = np.clip((p * 10).astype(int), 0, 9)
            out["reliability"] = [
                {"bin": f"{b / 10:.1f}-{(b + 1) / 10:.1f}", "count": int((bins == b).sum()),
                 "right": float(right[bins == b].mean()) if (bins == b).any() else None}
                for b in range(10)
            ]  # fmt: skip
    out["seconds"] = round(time.time() - start, 1)
    out["settings"] = {k: v for k, v in vars(args).items()}
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"{r['queries']} queries (fresh ShapeWorld scenes' captions, every level, four caption styles, and "
        f"{len(FOREIGN)} foreign sentences) against the demo gallery; right = the best image satisfies the query.",
        "",
        "| abstention | kept | right, all answers | right, kept | right, withheld | plain kept / right-kept | "
        "unseen styles kept / right-kept | foreign kept |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x: Any) -> str:
        return "—" if x is None else f"{x:.3f}"

    for rule, m in r["rules"].items():
        g = m["groups"]
        plain = [v for k, v in g.items() if k.startswith("plain")]
        unseen = [v for k, v in g.items() if k.split()[0] in ("photo", "synonyms", "reordered")]

        def pooled(vs: list) -> tuple[float, float | None]:
            n = sum(v["count"] for v in vs)
            kept = sum(v["kept"] * v["count"] for v in vs)
            rk = sum((v["right_kept"] or 0) * v["kept"] * v["count"] for v in vs)
            return kept / n, (rk / kept if kept else None)

        pk, pr = pooled(plain)
        uk, ur = pooled(unseen)
        lines.append(
            f"| {rule} | {m['kept']:.3f} | {m['right_all']:.3f} | {f(m['right_kept'])} | {f(m['right_withheld'])} | "
            f"{pk:.3f} / {f(pr)} | {uk:.3f} / {f(ur)} | {g['foreign']['kept']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--demo_dir", default="demo-out", help="The demo's output (its model is trained there if missing).")
    p.add_argument("--quick", action="store_true", help="The --quick demo's model and a small query set.")
    p.add_argument("--scenes", type=int, default=200, help="Fresh scenes per caption style (6 captions each).")
    p.add_argument("--seed", type=int, default=4242, help="Seed of the fresh scenes.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="bench-out/abstention.json")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.scenes = min(args.scenes, 30)
        if args.demo_dir == "demo-out":
            args.demo_dir = "demo-quick"
    result = run(args)
    from asymvlm.io import atomic_write_json, json_safe

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_safe(result), args.output)
    print(markdown(result))
    print(json.dumps({"calibration": result["calibration"], "seconds": result["seconds"]}))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
