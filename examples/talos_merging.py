"""TaLoS vs dense experts on ShapeWorld caption-style domains: who merges with less interference?

1. toy CLIP -> embedding caches of ShapeWorld per caption style (train / val / test splits);
2. a base head trained on the ``plain`` captions (the "pre-trained" model);
3. one expert per other caption style (``photo``, ``synonyms``, ``reordered``), fine-tuned from
   the base with ``asymvlm-train``'s loop twice: dense (every head parameter) and TaLoS (a mask
   from :func:`asymvlm.merging.talos.calibrate_mask` on the domain's data, ``--sparsity`` of the entries
   frozen, the rest trained through ``mask_file``);
4. each family of experts merged by task arithmetic (``asymvlm.merging.api.merge``) at lambda = 1 and at
   the lambda that the validation split picks (``--lam-grid``, mean normalised R@1);
5. per domain on the test split: exact text->image R@1 of the expert and of the merged model, and
   the normalised R@1 = merged / expert (1 = no interference).

The toy CLIP aligns the real caption styles so well that the base head is already at
ShapeWorld's exact-R@1 ceiling (ties between images that share every attribute) on all of them,
so experts gain nothing and merging has nothing to lose. ``--style-rotation A`` makes the styles
distinct: each non-plain style's caption embeddings ``t`` become ``cos(A) t + sin(A) Q t`` (``Q`` a
fixed random orthogonal matrix per style), an encoder that puts each style in its own region of
the sphere; at ``A = pi/2`` the base retrieves at chance and each expert must learn its style.

Run:  python examples/talos_merging.py [--train-images 4000] [--steps 300] [--sparsity 0.9]
                                       [--style-rotation 0.0] [--output_dir talos-out]
Prints a table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from asymvlm import embed_dataset, load_encoder
from asymvlm.batching import IndexBatcher
from asymvlm.cache import EmbeddingCache
from asymvlm.merging.api import merge, recall_at_1
from asymvlm.merging.talos import calibrate_mask, save_masks
from asymvlm.model import AsymVLM
from asymvlm.training.config import TrainConfig
from asymvlm.training.loop import train
from asymvlm.worlds import shapeworld as sw
from asymvlm.worlds.toyclip import TOY_CLIP_SPEC, TOY_CLIP_TAG, cache_root

DOMAINS = ("photo", "synonyms", "reordered")


def caches_for(encoder, style: str, n: dict[str, int], seed: int) -> dict[str, Path]:
    out = {}
    for i, (split, count) in enumerate(n.items()):
        data = sw.generate(count, seed=seed + 1000 * i + 17 * len(style), caption_styles=(style,))
        name = f"talos-{style}-{split}-{count}-{seed}-{encoder.fingerprint[:12]}"
        out[split] = embed_dataset(encoder, data, cache_root() / "caches" / name, batch_size=256).path
    return out


def rotated(caches: dict[str, Path], style: str, angle: float, out: Path) -> dict[str, Path]:
    """The style's caches with every caption embedding ``t`` replaced by
    ``cos(angle) t + sin(angle) Q t`` (renormalised), ``Q`` a fixed random orthogonal matrix of that
    style: an encoder that maps the style to its own region of the sphere (at ``angle = pi/2`` an
    isometry, so no information is lost, but a head trained on other styles retrieves at chance)."""
    from asymvlm.cache import write_cache

    g = torch.Generator().manual_seed(sum(ord(ch) * 31**i for i, ch in enumerate(style)) % 2**31)
    res, q = {}, None
    for split, path in caches.items():
        c = EmbeddingCache.load(path)
        if q is None:  # one matrix per style, shared by its splits
            q = torch.linalg.qr(torch.randn(c.dim, c.dim, generator=g, dtype=torch.float64))[0].float()
        t = c.text_embeddings.float()
        text = torch.nn.functional.normalize(math.cos(angle) * t + math.sin(angle) * (t @ q), dim=-1)
        res[split] = write_cache(
            out / f"{style}-{split}", c.image_embeddings.float(), text, c.text_image_index,
            encoder=c.manifest["encoder"], dataset_fingerprint=f"{c.dataset_fingerprint}+rot{angle}",
        ).path  # fmt: skip
    return res


def fit(cache: Path, out: Path, steps: int, lr: float, seed: int, **extra) -> Path:
    cfg = TrainConfig.from_dict(
        dict(
            cache_dir=str(cache),
            max_steps=steps,
            batch_size=512,
            optimizer="adamw",
            lr=lr,
            weight_decay=1e-4,
            warmup_steps=0,
            seed=seed,
            output_dir=str(out),
            save_every=0,
            eval_every=-1,
            log_with="none",
            **extra,
        )
    )
    return Path(train(cfg))


def test_r1(model_dir: Path, cache: Path) -> float:
    head = AsymVLM.from_pretrained(model_dir, load_encoder=False).head
    c = EmbeddingCache.load(cache)
    return recall_at_1(head, c.text_embeddings, c.image_embeddings, c.text_image_index)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sparsity", type=float, default=0.9, help="TaLoS: fraction of head entries frozen")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024, 1024])
    p.add_argument(
        "--activation", default="gelu", help="head activation (ReLU heads have dead units: exactly zero sensitivity)"
    )
    p.add_argument("--lam-grid", default="0.2,0.4,0.6,0.8,1.0,1.2")
    p.add_argument(
        "--style-rotation", type=float, default=0.0,
        help="rotate each non-plain style's caption embeddings by this angle into its own region (0: the real styles)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", "--output-dir", dest="out", default="talos-out")
    args = p.parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(TOY_CLIP_SPEC, pretrained=TOY_CLIP_TAG, device="cpu")
    sizes = {"train": args.train_images, "val": args.eval_images, "test": args.eval_images}
    caches = {s: caches_for(encoder, s, sizes, args.seed) for s in ("plain", *DOMAINS)}
    if args.style_rotation != 0:
        caches.update({d: rotated(caches[d], d, args.style_rotation, out / "rotated-caches") for d in DOMAINS})
    print(f"caches ready ({time.time() - t0:.0f} s)")
    common = dict(hidden_dims=list(args.hidden), activation=args.activation)
    base = fit(caches["plain"]["train"], out / "base", args.base_steps, args.lr, args.seed, **common)
    experts: dict[str, list[Path]] = {"dense": [], "talos": []}
    densities = {}
    for d in DOMAINS:
        experts["dense"].append(
            fit(caches[d]["train"], out / f"dense-{d}", args.steps, args.lr, args.seed, init_from=str(base))
        )
        model = AsymVLM.from_pretrained(base, load_encoder=False)
        c = EmbeddingCache.load(caches[d]["train"])
        batcher = IndexBatcher(
            c.text_embeddings.float(), c.image_embeddings.float(), c.text_image_index, 256, args.seed
        )
        masks = calibrate_mask(
            model, batcher, args.sparsity, args.rounds, num_batches=args.calib_batches, seed=args.seed
        )
        mask_path = save_masks(masks, out / f"mask-{d}.safetensors", {"sparsity": args.sparsity, "rounds": args.rounds})
        densities[d] = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        experts["talos"].append(
            fit(
                caches[d]["train"],
                out / f"talos-{d}",
                args.steps,
                args.lr,
                args.seed,
                init_from=str(base),
                mask_file=str(mask_path),
            )
        )
    grid = [float(x) for x in args.lam_grid.split(",")]
    results: dict = {"args": vars(args), "mask_density": densities, "families": {}}
    for fam, dirs in experts.items():
        row: dict = {"expert_R@1": {}, "merged": {}}
        for d, e in zip(DOMAINS, dirs):
            row["expert_R@1"][d] = test_r1(e, caches[d]["test"])
        base_r1 = {d: test_r1(base, caches[d]["test"]) for d in DOMAINS}
        row["base_R@1"] = base_r1
        for label, kw in (
            ("lam=1", {"lam": 1.0}),
            # frozen-direction heads rank by the frozen cosine, so R@1 cannot move with lambda: the likelihood can
            ("lam=val", {"lam_grid": grid, "val": [caches[d]["val"] for d in DOMAINS], "select_by": "likelihood"}),
        ):
            m_dir = out / f"merged-{fam}-{label.replace('=', '')}"
            rep = merge(base, dirs, m_dir, "talos" if fam == "talos" else "task_arithmetic", **kw)
            r1 = {d: test_r1(m_dir, caches[d]["test"]) for d in DOMAINS}
            norm = {d: r1[d] / row["expert_R@1"][d] for d in DOMAINS}
            row["merged"][label] = {"lam": rep["lam"], "R@1": r1, "normalised_R@1": norm,
                                    "mean_normalised_R@1": sum(norm.values()) / len(norm)}  # fmt: skip
        results["families"][fam] = row
    results["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nTaLoS sparsity {args.sparsity} (trainable density {sum(densities.values()) / len(densities):.3f})")
    print(f"{'family':<7} {'merge':<8} {'lam':>5} " + " ".join(f"{d:>22}" for d in DOMAINS) + "   mean norm.")
    for fam, row in results["families"].items():
        for label, m in row["merged"].items():
            cells = " ".join(
                f"{m['R@1'][d]:.3f}/{row['expert_R@1'][d]:.3f}={m['normalised_R@1'][d]:.3f}".rjust(22) for d in DOMAINS
            )
            print(f"{fam:<7} {label:<8} {m['lam']:>5.2f} {cells}   {m['mean_normalised_R@1']:.3f}")
    base_r1 = results["families"]["dense"]["base_R@1"]
    print(f"(cells: merged R@1 / expert R@1 = normalised R@1, test split; base R@1 {base_r1})")
    print(f"done in {results['seconds']:.0f} s; {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
