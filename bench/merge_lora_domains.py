"""LoRA experts on the multi-domain merging task: KnOTS and Core Space against the dense merges (issue 31).

The same task as ``bench/merge_domains.py`` (a toy CLIP trained on plain captions only, a base head on
plain captions, caption styles the encoder never saw as the experts' domains, the base domain counted
too), but each expert is a rank-``--rank`` LoRA adapter of the text tower trained on its style with the
base head fixed (``trainable=lora``). The adapters are merged by task arithmetic (exact concatenation),
TIES on the dense updates (written at the sum of the ranks, exact), KnOTS and Core Space (TIES in
their aligned spaces, and task arithmetic there, which must equal plain task arithmetic), lambda
chosen on the validation splits by the mean normalised R@1 over every domain and the base domain.
Each merged adapter is applied to a fresh copy of the tower and the splits' captions re-encoded.

Run:  python bench/merge_lora_domains.py --seeds 0,1,2 --json bench-out/merge-lora-domains.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from merge_domains import _fmt, base_world

LAM_GRID = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)  # no choice reached its edge (bench/RESULTS.md)
METHODS = (  # (row name, registry method, options, LoRA output)
    ("task arithmetic", "task_arithmetic", {}, "concat"),
    ("TIES (dense dW)", "ties", {"density": 0.2}, "svd"),
    ("KnOTS-TIES", "knots", {"inner": "ties", "density": 0.2}, "svd"),
    ("KnOTS-TA", "knots", {"inner": "task_arithmetic"}, "svd"),
    ("Core Space-TIES", "core_space", {"inner": "ties", "density": 0.2}, "svd"),
    ("Core Space-TA", "core_space", {"inner": "task_arithmetic"}, "svd"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", default="photo,reordered", help="One LoRA expert per caption style (the demo's).")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank of each expert.")
    p.add_argument("--expert_steps", type=int, default=120, help="LoRA expert steps.")
    p.add_argument("--expert_lr", type=float, default=2e-3, help="AdamW lr of the LoRA experts.")
    p.add_argument("--seeds", default="0", help="Comma-separated seeds.")
    p.add_argument("--out", default="bench-out/merge-lora-domains")
    p.add_argument("--json", default="")
    return p


class Tower:
    """Re-encodes each split's captions through the tower with an adapter, and scores R@1 with the base head."""

    def __init__(self, spec: str, splits: dict[str, dict[str, Path]], head: Any):
        from asymvlm.merging.selection import _load_val

        self.spec, self.head, self.names = spec, head, tuple(splits)
        self.data = {part: dict(zip(self.names, _load_val([splits[d][part] for d in self.names])))
                     for part in ("val", "test")}  # fmt: skip
        from asymvlm.cache import EmbeddingCache

        self.captions = {
            part: {d: EmbeddingCache.load(splits[d][part]).captions for d in self.names} for part in ("val", "test")
        }

    def r1(self, adapter: Path | None, part: str) -> dict[str, float]:
        from asymvlm.encoders import load_encoder
        from asymvlm.merging.selection import _retrieval_scores
        from asymvlm.model import apply_text_adapter

        enc = load_encoder(self.spec, device="cpu")
        if adapter is not None:
            apply_text_adapter(enc, adapter)
        out = {}
        for d in self.names:
            v = self.data[part][d]
            with torch.no_grad():
                text = enc.encode_text(self.captions[part][d]).float()
            hits = _retrieval_scores(self.head, text, v["images"], v["positives"], v["index"], 1024)[1]
            out[d] = float(hits.double().mean())
        return out


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from asymvlm.merging.lora import merge_lora_adapters
    from asymvlm.model import AsymVLM
    from asymvlm.training import demo_steps

    w = base_world("plain", "plain", args.domains, seed, args.out)  # the same splits as bench/merge_domains.py
    spec, settings, splits, base, out, doms = w["spec"], w["settings"], w["splits"], w["base"], w["out"], w["doms"]
    recipe = w["recipe"]
    tower = Tower(spec, splits, AsymVLM.from_pretrained(base, load_encoder=False).head)
    t = time.time()
    adapters = []
    for d in doms:
        m = demo_steps.train_head(
            splits[d]["train"], out / f"lora-{d}", settings, "vmf", seed, init_from=str(base), trainable="lora",
            encoder=spec, pretrained="", lora_r=args.rank, lora_alpha=2.0 * args.rank, steps=args.expert_steps,
            lr=args.expert_lr, direction="learned", progress=False,
        )  # fmt: skip
        adapters.append(m / "text_adapter")
    print(f"  seed {seed}: {len(doms)} LoRA experts, {time.time() - t:.0f} s", flush=True)
    ref_val, ref_test = tower.r1(None, "val"), tower.r1(None, "test")  # the base on every domain
    rows: dict[str, Any] = {"base": {"R@1": dict(ref_test)}}
    for d, a in zip(doms, adapters):
        ev, et = tower.r1(a, "val"), tower.r1(a, "test")
        ref_val[d], ref_test[d] = ev[d], et[d]
        rows[f"expert {d}"] = {"R@1": et}
    tmp = out / "merges"
    for name, method, opts, output in METHODS:
        curve = {}
        for lam in LAM_GRID:
            target = tmp / f"{method}-{lam}"
            rep = merge_lora_adapters(adapters, target, method, lam=lam, output=output, **opts)
            norm = {d: v / ref_val[d] for d, v in tower.r1(target, "val").items()}
            curve[lam] = (sum(norm.values()) / len(norm), target, rep)
        lam = max(curve, key=lambda x: curve[x][0])
        r1 = tower.r1(curve[lam][1], "test")
        norm = {d: r1[d] / ref_test[d] if ref_test[d] > 0 else math.nan for d in r1}
        rank = curve[lam][2].get("rank")
        rows[name] = {"lam": lam, "R@1": r1, "normalised": norm, "min_normalised": min(norm.values()), "rank": rank}
        print(f"  seed {seed}: {name}: lam {lam}, min normalised {rows[name]['min_normalised']:.3f}", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"seed": seed, "rows": rows, "toy_clip": recipe.fingerprint()}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t = time.time()
    results = [run_seed(args, int(s)) for s in args.seeds.split(",")]
    names = ("plain", *args.domains.split(","))
    print("\nLoRA experts: normalised test R@1 (merge / the domain's expert; base domain: merge / base), mean ± sd")
    print("| method | " + " | ".join(names) + " | min | lambda |")
    print("|---|" + "---|" * (len(names) + 2))
    for r in results[0]["rows"]:
        row = results[0]["rows"][r]
        if "normalised" in row:
            per = [[res["rows"][r]["normalised"][d] for res in results] for d in names]
            mins = [res["rows"][r]["min_normalised"] for res in results]
            lams = [res["rows"][r]["lam"] for res in results]
            print(f"| {r} | " + " | ".join(_fmt(v) for v in per) + f" | {_fmt(mins)} | {lams} |")
    print("\ntest R@1 per domain")
    for r in results[0]["rows"]:
        per = [[res["rows"][r]["R@1"][d] for res in results] for d in names]
        print(f"| {r} | " + " | ".join(_fmt(v) for v in per) + " |")
    from run_all import machine_info

    env = machine_info()
    print(f"\n{len(results)} seed(s), {time.time() - t:.0f} s; toy CLIP {results[0]['toy_clip']}; {env}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "environment": env}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
