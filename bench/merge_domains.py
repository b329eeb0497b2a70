"""Every merge method on the multi-domain merging task, base domain included (issues 15 and 31).

A v3 toy CLIP trained on ``--clip_styles`` only (plain captions), a base head (learned mean) trained
on ``--base_styles``, and per caption style in ``--domains`` (styles the encoder never saw) one dense
expert and one TaLoS-masked expert fine-tuned from the base. Each merge method merges the experts'
task vectors; its lambda is chosen on the validation splits by the mean normalised R@1 over every
domain *and the base domain* (so a merge that forgets the base's captions pays for it). LiNeS then
rescales the best method's merge by depth (its beta chosen the same way, lambda fixed), and the
Fisher-weighted merge uses each head's own Fisher (sampled from its vMF), the base's included.

Printed per method and seed, and as mean +- sd over seeds:
* test R@1 per domain normalised by the dense expert of that domain (by the base on the base domain),
  one yardstick for every row (TaLoS merges too: their sparse experts are listed with the rest);
* uncertainty quality per domain: the error AUROC of ``1/kappa`` for R@1 misses on the test split
  (specific captions, levels 4 and 5) and the Spearman correlation of ``1/kappa`` with the caption's
  true ambiguity on an all-levels split.

Not part of ``make bench`` (minutes: the toy CLIP build is about 4 minutes on first use, then about
2 minutes per seed). Run:  python bench/merge_domains.py --seeds 0,1,2 --json bench-out/merge-domains.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

METHODS = (  # (row name, registry method, options, which experts)
    ("task arithmetic", "task_arithmetic", {}, "dense"),
    ("TIES", "ties", {"density": 0.2}, "dense"),
    ("DARE-TIES", "dare_ties", {"p": 0.9, "seed": 0}, "dense"),
    ("TaLoS", "talos", {}, "talos"),
    ("TSV-M", "tsv_m", {}, "dense"),
    ("Iso-C", "iso_c", {}, "dense"),
    ("Iso-CTS", "iso_cts", {}, "dense"),
    ("Fisher (sampled, + base)", "fisher", {}, "dense"),
)
LAM_GRID = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
BETA_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip_styles", default="plain", help="Caption styles the toy CLIP is trained on.")
    p.add_argument("--base_styles", default="plain", help="Caption styles of the base head (the base domain).")
    p.add_argument(
        "--domains",
        default="photo,reordered",
        help="One expert per caption style (the demo's; synonyms is degenerate here: the plain-only toy CLIP "
        "gives its captions chance-level R@1 and its expert learns nothing)",
    )
    p.add_argument("--expert_steps", type=int, default=80, help="Expert fine-tuning steps (the demo's 80).")
    p.add_argument("--expert_lr", type=float, default=1e-3, help="AdamW lr of the experts (the demo's: 1e-3).")
    p.add_argument("--seeds", default="0", help="Comma-separated seeds (heads, experts, splits).")
    p.add_argument("--fisher_pairs", type=int, default=1000, help="Caption pairs per Fisher estimate.")
    p.add_argument("--methods", default="", help="Comma-separated row names to run (default: all).")
    p.add_argument("--out", default="bench-out/merge-domains")
    p.add_argument("--json", default="", help="Write every number here.")
    return p


def _split(encoder: Any, style: str, n: int, seed: int, root: Path, name: str, levels: Any) -> Path:
    from asymvlm import embed_dataset
    from asymvlm.worlds import shapeworld as sw

    data = sw.generate(n, seed=seed, caption_styles=(style,), version=3, **({"levels": levels} if levels else {}))
    path = root / f"md-{style}-{name}-{n}-{seed}-{encoder.fingerprint[:12]}"
    return embed_dataset(encoder, data, path, batch_size=256, progress=False).path


def base_world(clip_styles: str, base_styles: str, domains: str, seed: int, out_root: str) -> dict[str, Any]:
    """What both merging benchmarks share: the toy CLIP trained on ``clip_styles``, the demo's sizes,
    each domain's train / val / test splits (the base domain's first), and the base head trained on
    ``base_styles`` (under ``out_root/<toy CLIP>/seed<seed>``)."""
    from asymvlm.config import DataArguments
    from asymvlm.encoders import load_encoder
    from asymvlm.training import demo, demo_steps
    from asymvlm.worlds import shapeworld as sw
    from asymvlm.worlds.data import cache_for_config
    from asymvlm.worlds.toyclip import ToyCLIPRecipe, cache_root, ensure_toy_clip

    recipe = ToyCLIPRecipe(world_version=3, caption_styles=tuple(clip_styles.split(",")))
    spec = f"open_clip:local-dir:{ensure_toy_clip(recipe, progress=False)}"
    enc = load_encoder(spec, device="cpu")
    ns = argparse.Namespace(
        quick=False, train_images=None, eval_images=None, steps=None, rounds=None, clients=8, world=3
    )
    settings = demo._settings(ns)
    n, root = settings["domain_images"], cache_root() / "caches"
    doms, base_dom = tuple(domains.split(",")), base_styles.split(",")[0]
    splits: dict[str, dict[str, Path]] = {}
    for d in (base_dom, *doms):
        k = 1000 * seed + 100 * sw.CAPTION_STYLES.index(d)
        lv = demo_steps.DOMAIN_TEST_LEVELS
        splits[d] = {
            "train": _split(enc, d, 4 * n, k + 1, root, "train", None),
            "val": _split(enc, d, n, k + 2, root, "val", lv),
            "test": _split(enc, d, n, k + 3, root, "test", lv),
        }
    base_cache = cache_for_config(
        DataArguments(dataset="shapeworld:3", encoder=spec, pretrained="", train_images=settings["train_images"],
                      data_seed=seed, caption_styles=base_styles),
        enc,
    )  # fmt: skip
    out = Path(out_root) / recipe.fingerprint() / f"seed{seed}"
    base = demo_steps.train_head(base_cache.path, out / "base", settings, "vmf", seed, direction="learned",
                                 progress=False)  # fmt: skip
    return {"recipe": recipe, "spec": spec, "encoder": enc, "settings": settings, "doms": doms, "base_dom": base_dom,
            "splits": splits, "base_cache": base_cache.path, "base": base, "out": out}  # fmt: skip


def build_world(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """:func:`base_world`, each domain's all-levels split (true ambiguity per caption) and the experts."""
    from asymvlm.eval.benchmark import shapeworld_eval_data
    from asymvlm.worlds import shapeworld as sw

    w = base_world(args.clip_styles, args.base_styles, args.domains, seed, args.out)
    n = w["settings"]["domain_images"]
    w["levels"] = {
        d: shapeworld_eval_data(w["encoder"], n=n, seed=1000 * seed + 100 * sw.CAPTION_STYLES.index(d) + 4,
                                caption_styles=(d,), version=3)
        for d in (w["base_dom"], *w["doms"])
    }  # fmt: skip
    w["experts"] = _train_experts(args, w["settings"], w["splits"], w["doms"], w["base"], w["out"], seed)
    return w


def _train_experts(args, settings, splits, doms, base: Path, out: Path, seed: int) -> dict[str, list[Path]]:
    from asymvlm.batching import IndexBatcher
    from asymvlm.cache import EmbeddingCache
    from asymvlm.merging.talos import calibrate_mask, save_masks
    from asymvlm.model import AsymVLM
    from asymvlm.training import demo_steps

    base_model = AsymVLM.from_pretrained(base, load_encoder=False)
    experts: dict[str, list[Path]] = {"dense": [], "talos": []}
    for d in doms:
        common = dict(init_from=str(base), steps=args.expert_steps, lr=args.expert_lr, direction="learned",
                      progress=False)  # fmt: skip
        train = splits[d]["train"]
        experts["dense"].append(demo_steps.train_head(train, out / f"dense-{d}", settings, "vmf", seed, **common))
        c = EmbeddingCache.load(train)
        batcher = IndexBatcher(c.text_embeddings.float(), c.image_embeddings.float(), c.text_image_index, 256, seed)
        masks = calibrate_mask(base_model, batcher, 0.9, 4, num_batches=4)
        mask = save_masks(masks, out / f"talos-mask-{d}.safetensors", {"sparsity": 0.9, "rounds": 4})
        experts["talos"].append(
            demo_steps.train_head(train, out / f"talos-{d}", settings, "vmf", seed, mask_file=str(mask), **common)
        )
    return experts


class Scorer:
    """Loads each split once; scores a head's parameters per domain."""

    def __init__(self, world: dict[str, Any], template: Any):
        import copy

        from asymvlm.merging.selection import _load_val

        self.names = (world["base_dom"], *world["doms"])
        self.data = {part: dict(zip(self.names, _load_val([world["splits"][d][part] for d in self.names])))
                     for part in ("val", "test")}  # fmt: skip
        self.levels = world["levels"]
        self.head = copy.deepcopy(template)

    def _hits(self, d: dict[str, Any]) -> torch.Tensor:
        from asymvlm.merging.selection import _retrieval_scores

        return _retrieval_scores(self.head, d["text"], d["images"], d["positives"], d["index"], 1024)[1]

    def r1(self, params: dict[str, torch.Tensor], part: str = "val") -> dict[str, float]:
        self.head.load_state_dict(params)
        return {n: float(self._hits(self.data[part][n]).double().mean()) for n in self.names}

    def report(self, params: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """Test R@1, error AUROC of 1/kappa and its Spearman with the true ambiguity, per domain."""
        from asymvlm.eval.uncertainty import ambiguity_spearman, error_auroc

        self.head.load_state_dict(params)
        out = {}
        for n in self.names:
            d = self.data["test"][n]
            hits = self._hits(d)
            with torch.no_grad():
                u = self.head.uncertainty(d["text"].float())
                u_lv = self.head.uncertainty(self.levels[n].text_embeddings.float())
            amb = self.levels[n].ambiguity
            out[n] = {"R@1": float(hits.double().mean()), "error_AUROC": error_auroc(u, hits.double()),
                      "ambiguity_spearman": ambiguity_spearman(u_lv, amb)}  # fmt: skip
        return out


def _params(model_dir: Path) -> dict[str, torch.Tensor]:
    from asymvlm.model import AsymVLM

    sd = AsymVLM.from_pretrained(model_dir, load_encoder=False).head.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}


def _normalised(r1: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    return {d: r1[d] / ref[d] if ref[d] > 0 else math.nan for d in r1}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Every method's merge of one seed's experts: lambda (and LiNeS' beta) by validation."""
    from asymvlm.merging.fisher import attach_fishers, compute_fisher
    from asymvlm.merging.methods import merge_params
    from asymvlm.model import AsymVLM

    w = build_world(args, seed)
    base, doms, bd = w["base"], w["doms"], w["base_dom"]
    scorer = Scorer(w, AsymVLM.from_pretrained(base, load_encoder=False).head)
    bp = _params(base)
    ref_val, ref_test = scorer.r1(bp, "val"), scorer.r1(bp, "test")
    for d, e in zip(doms, w["experts"]["dense"]):  # each dense expert's own domain is its reference
        ep = _params(e)
        ref_val[d], ref_test[d] = scorer.r1(ep, "val")[d], scorer.r1(ep, "test")[d]
    rows: dict[str, Any] = {"base": {"report": scorer.report(bp)}}
    for kind in ("dense", "talos"):
        for d, e in zip(doms, w["experts"][kind]):
            rows[f"{kind} expert {d}"] = {"report": scorer.report(_params(e))}
    # diagnostics: each expert's task vector alone, scaled by its own lambda (what any merge can keep
    # of the base domain and that expert's domain at once, before the experts interfere)
    alone = tuple((f"{d} expert alone", "task_arithmetic", {}, f"dense:{i}") for i, d in enumerate(doms))
    chosen = [m for m in (*METHODS, *alone) if not args.methods or m[0] in args.methods.split(",")]
    if any(m[1] == "fisher" for m in chosen):
        t = time.time()
        for e in (base, *w["experts"]["dense"]):
            cache = w["base_cache"] if e == base else w["splits"][doms[w["experts"]["dense"].index(e)]]["train"]
            compute_fisher(e, cache, estimator="sampled", max_pairs=args.fisher_pairs, seed=seed)
        print(f"  seed {seed}: Fishers of the base and {len(doms)} experts: {time.time() - t:.0f} s", flush=True)
    # one yardstick for every row: the dense expert of each domain (the base on the base domain)
    refs = {d: ref_val[d] for d in (bd, *doms)}
    trefs = {d: ref_test[d] for d in (bd, *doms)}
    best = None
    for name, method, opts, kind in chosen:
        paths = w["experts"][kind.split(":")[0]]
        paths = [paths[int(kind.split(":")[1])]] if ":" in kind else paths
        taus = [{k: v - bp[k] for k, v in _params(p).items()} for p in paths]
        weights = None
        if method == "fisher":
            taus, weights, _ = attach_fishers(base, paths, taus, None)

        # an expert alone is scored by the worse of the base domain and its own (min), a merge by the mean
        focus = (bd, doms[int(kind.split(":")[1])]) if ":" in kind else None

        def score(extra: dict[str, Any], taus=taus, weights=weights, method=method, opts=opts, focus=focus):
            merged = merge_params(bp, taus, method, weights=weights, **{**opts, **extra})
            norm = _normalised(scorer.r1(merged, "val"), refs)
            if focus is not None:
                return min(norm[d] for d in focus), merged
            return sum(norm.values()) / len(norm), merged

        curve = {lam: score({"lam": lam}) for lam in LAM_GRID}
        lam = max(curve, key=lambda x: curve[x][0])
        row = _row(scorer, curve[lam][1], trefs, {"lam": lam, "val_score": curve[lam][0]})
        rows[name] = row
        print(f"  seed {seed}: {name}: lam {lam}, min normalised {row['min_normalised']:.3f}", flush=True)
        if ":" not in kind and (best is None or row["val_score"] > rows[best[0]]["val_score"]):
            best = (name, score, lam)
    if best is not None:  # LiNeS on the best by validation: beta chosen on validation, lambda 1 (the paper's)
        name, score, _ = best
        curve = {b: score({"lam": 1.0, "lines": b}) for b in BETA_GRID}
        beta = max(curve, key=lambda x: curve[x][0])
        extra = {"lines_beta": beta, "val_score": curve[beta][0], "on": name}
        rows["LiNeS on the best by validation"] = _row(scorer, curve[beta][1], trefs, extra)
    return {"seed": seed, "rows": rows, "toy_clip": w["recipe"].fingerprint()}


def _row(scorer: Scorer, merged, trefs, extra) -> dict[str, Any]:
    rep = scorer.report(merged)
    norm = _normalised({d: rep[d]["R@1"] for d in rep}, trefs)
    return {**extra, "report": rep, "normalised": norm, "min_normalised": min(norm.values())}


def _fmt(values: list[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "nan"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def print_tables(results: list[dict[str, Any]], names: tuple[str, ...]) -> None:
    rows = list(results[0]["rows"])
    print("\nnormalised test R@1 (merge / the domain's expert; base domain: merge / base), mean ± sd over seeds")
    print("| method | " + " | ".join(names) + " | min | lambda / beta |")
    print("|---|" + "---|" * (len(names) + 2))
    for r in rows:
        if "normalised" not in results[0]["rows"][r]:
            continue
        per = [[res["rows"][r]["normalised"][d] for res in results] for d in names]
        mins = [res["rows"][r]["min_normalised"] for res in results]
        knob = [
            res["rows"][r].get("lam", f"beta {res['rows'][r].get('lines_beta')} on {res['rows'][r].get('on')}")
            for res in results
        ]
        print(f"| {r} | " + " | ".join(_fmt(v) for v in per) + f" | {_fmt(mins)} | {knob} |")
    for metric in ("R@1", "error_AUROC", "ambiguity_spearman"):
        print(f"\n{metric} per domain (test; ambiguity on an all-levels split), mean ± sd over seeds")
        print("| model | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for r in rows:
            per = [[res["rows"][r]["report"][d][metric] for res in results] for d in names]
            print(f"| {r} | " + " | ".join(_fmt(v) for v in per) + " |")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.manual_seed(0)
    t = time.time()
    results = [run_seed(args, int(s)) for s in args.seeds.split(",")]
    names = (args.base_styles.split(",")[0], *args.domains.split(","))
    from run_all import machine_info

    env = machine_info()
    if args.json:  # before the tables: every number is kept even if printing fails
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "environment": env}, indent=1, default=str))
    print_tables(results, names)
    print(f"\n{len(results)} seed(s), {time.time() - t:.0f} s; toy CLIP {results[0]['toy_clip']}; {env}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
